"""The `pykvm` command: run guests, report KVM capabilities, inspect crash cores."""

from __future__ import annotations

import os
import re
import sys

import click

from . import __version__
from .errors import (EXIT_KVM_UNAVAILABLE, EXIT_USAGE, EXIT_VMM_ERROR, BadCoreError, OutputPathError,
                     PykvmError, UsageError)
from .units import parse_size


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number (decimal or 0x-prefixed hex)") from None


def _fail(e: BaseException, debug: bool, status: int) -> None:
    if debug:
        import traceback

        traceback.print_exception(e)
    click.echo(f"pykvm: error: {e}", err=True)
    sys.exit(status)


def _KvmUnavailable():
    """KvmUnavailable if the KVM bindings were imported (else nothing can raise it: don't load them for it)."""
    mod = sys.modules.get(f"{__package__}.kvm.errors")
    return mod.KvmUnavailable if mod else ()


def _guard(fn, debug: bool):
    """Run fn, turning known errors into one line and a distinct status (traceback only with --debug)."""
    try:
        return fn()
    except PykvmError as e:
        _fail(e, debug, e.exit_status)
    except _KvmUnavailable() as e:
        _fail(e, debug, EXIT_KVM_UNAVAILABLE)
    except (click.exceptions.Exit, BrokenPipeError):
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a pykvm bug: say so, keep the status distinct
        if not debug:
            click.echo(f"pykvm: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", err=True)
            sys.exit(EXIT_VMM_ERROR)
        _fail(e, debug, EXIT_VMM_ERROR)


def _usage_exit(e: click.UsageError) -> None:
    """Print a click usage error as one line, like every other pykvm error, and exit with EXIT_USAGE."""
    names, ctx = [], e.ctx
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    where = " ".join(["pykvm", *reversed(names)])
    click.echo(f"pykvm: error: {e.format_message()} (see `{where} --help`)", err=True)
    sys.exit(EXIT_USAGE)


def _die_of_sigpipe() -> None:
    """The reader of our output went away: end as a C tool would, killed by SIGPIPE, without a message."""
    import signal

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # so the interpreter's final flush cannot complain
    except (OSError, ValueError):
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)   # not reached


class _Cli(click.Group):
    """The command group: one-line usage errors, and a quiet end when stdout's reader goes away."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            _usage_exit(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            _usage_exit(e)
        except BrokenPipeError:
            _die_of_sigpipe()

    def main(self, *args, **kwargs):
        try:
            try:
                return super().main(*args, **kwargs)
            finally:
                sys.stdout.flush()
        except BrokenPipeError:
            _die_of_sigpipe()


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pykvm")
def main():
    """pykvm: run tiny x86-64 guest kernels on /dev/kvm.

    \b
    Exit statuses of `pykvm run`:
      0    guest powered off (outw 0x604, 0x2000)
      odd  guest wrote v to the debug-exit port: status (v << 1) | 1
      2    bad option           4  /dev/kvm unavailable   6  bad kernel image
      8    kernel/initrd doesn't fit in RAM               10 device configuration error
      12   unknown bundled guest                          14 toolchain missing / build failed
      16   guest crashed        18 timeout                20 pykvm internal error
      22   bad memory size      24 not a readable core (inspect)
      26   bad/incompatible state file (restore)          28 --serial/--crash-dir not writable
      30   sandbox: a blocked system call stopped the VMM, or it could not be set up
      32   bad vNUMA spec (--numa-node, --numa, --numa-distance, --memory-max)
      34   bad topology file (pykvm up)
      130  interrupted
    """


@main.command()
@click.argument("kernel")
@click.option("--mem", "-m", default="128M", show_default=True, help="Guest RAM, e.g. 64M, 1G (bare number = MiB).")
@click.option("--cpus", "-c", default=1, show_default=True, type=click.IntRange(1, 255), help="Number of vCPUs.")
@click.option("--cmdline", "-a", default="", help="Kernel command line.")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False), help="File passed as multiboot module 0 / initrd.")
@click.option("--serial", default="stdio", show_default=True,
              help="Where COM1 output goes: stdio, none, or a file path.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop the guest after this many seconds.")
@click.option("--exit-port", default="0xf4", show_default=True, help="isa-debug-exit port.")
@click.option("--irqchip", type=click.Choice(["split", "full"]), default="split", show_default=True,
              help="split: LAPIC in kernel; full: also IOAPIC, PIC and PIT in kernel (slower to create).")
@click.option("--trace-io", is_flag=True, help="Print accesses to ports/MMIO no device claims.")
@click.option("--strict-io", is_flag=True, help="Treat accesses to unclaimed ports/MMIO as a guest crash.")
@click.option("--load-addr", default=None, help="Treat KERNEL as a flat binary loaded (and entered) here.")
@click.option("--entry-mode", type=click.Choice(["64", "32", "16"]), default="64", show_default=True,
              help="CPU mode for flat binaries.")
@click.option("--crash-dir", default="crashes", show_default=True, type=click.Path(file_okay=False),
              help="Where crash cores are written.")
@click.option("--no-dump", is_flag=True, help="Do not write a core when the guest crashes or hangs.")
@click.option("--control", "control_path", type=click.Path(dir_okay=False),
              help="Serve host commands (pykvm ctl) on this unix socket while the guest runs.")
@click.option("--restart-intensity", default="5/60", show_default=True,
              help="Device restarts allowed per period (N/SECONDS) before a failure escalates.")
@click.option("--on-device-failure", type=click.Choice(["remove", "crash"]), default="remove", show_default=True,
              help="Past the restart intensity: surprise-remove the device, or stop the VM with a core.")
@click.option("--trust", type=click.Choice(["trusted", "untrusted"]), default="trusted", show_default=True,
              help="Device access policy level (see `pykvm devices --describe NAME`).")
@click.option("--bus", is_flag=True, help="Give the guest a partition bus (echo, shutdown, heartbeat services).")
@click.option("--disk", "disks", multiple=True, metavar="FILE[,ro]",
              help="A raw disk image served by the bus's block service (implies --bus); repeatable.")
@click.option("--sandbox", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Confine the VMM with seccomp once set up (off: for debugging).")
@click.option("--gdb", "gdb_spec", metavar="tcp::PORT|unix:PATH",
              help="Serve gdb's remote protocol here (gdb: target remote :PORT); port 0 picks a free one.")
@click.option("--gdb-wait", is_flag=True, help="With --gdb: run no guest code until gdb connects and continues.")
@click.option("--numa-node", "numa_nodes", multiple=True, metavar="mem=SIZE,cpus=A-B[,min=,max=,hotadd=,buffer=PCT]",
              help="A virtual NUMA node (repeat per node); implies the dynamic memory service on the bus.")
@click.option("--numa", "numa_count", type=int, default=None, metavar="N",
              help="Split --mem and --cpus evenly into N virtual NUMA nodes.")
@click.option("--numa-distance", default=None, metavar="MATRIX",
              help="Node distances: rows '10,21;21,10' or pairs '0-1=21' (default 10 local, 20 remote).")
@click.option("--memory-max", default=None, metavar="SIZE", help="vNUMA: most RAM the balancer gives the VM in total.")
@click.option("--memory-log", type=click.Path(dir_okay=False), default=None,
              help="vNUMA: write the dynamic memory timeline here as JSON lines (chart: scripts/memory_chart.py).")
@click.option("--device", "device_specs", multiple=True, metavar="NAME[,key=value...]",
              help="Add a device beyond the default set (repeatable; `pykvm devices` lists them).")
@click.option("--cpu", "cpu_model", default="host", show_default=True, metavar="host[,+FEAT,-FEAT...]",
              help="CPU model: the host's, with CPUID features added or hidden (QEMU/Linux names: x2apic, cx16, ...).")
@click.option("--display", type=click.Choice(["none", "text"]), default="none", show_default=True,
              help="text: show the guest's 80x25 VGA text screen (0xb8000) in the terminal.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def run(kernel, mem, cpus, cmdline, initrd, serial, timeout, exit_port, irqchip, trace_io, strict_io,
        load_addr, entry_mode, crash_dir, no_dump, control_path, restart_intensity, on_device_failure, trust,
        bus, disks, sandbox, gdb_spec, gdb_wait, numa_nodes, numa_count, numa_distance, memory_max, memory_log,
        device_specs, cpu_model, display, debug):
    """Boot KERNEL (a path, or the name of a bundled guest such as `hello`)."""
    exit_port_n = _int(exit_port)
    if not 0 <= exit_port_n <= 0xFFFC:
        raise click.BadParameter(f"{exit_port} is not an I/O port", param_hint="--exit-port")
    flat_addr = _int(load_addr) if load_addr is not None else None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*", restart_intensity)
    if not m or float(m.group(2)) <= 0:
        raise click.BadParameter(f"{restart_intensity!r}: expected N/SECONDS, e.g. 5/60", param_hint="--restart-intensity")
    intensity, period = int(m.group(1)), float(m.group(2))
    if gdb_wait and not gdb_spec:
        raise click.BadParameter("needs --gdb", param_hint="--gdb-wait")
    ctx = click.get_current_context()
    given = lambda name: ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT  # noqa: E731

    def go():
        from .api import VM, device_spec
        from .memory import numa as numa_spec

        extra_devices = [device_spec(spec) for spec in device_specs]    # bad specs: one line, status 10
        size = parse_size(mem)
        nodes = numa_spec.from_options(numa_nodes, numa_count, numa_distance, size if given("mem") else None,
                                       cpus if given("cpus") else None,
                                       numa_spec.parse_size(memory_max, "--memory-max") if memory_max else None)
        vcpus, ram = cpus, size
        if nodes is not None:
            vcpus, ram = nodes.cpus, nodes.mem
        if not no_dump:
            _check_crash_dir(crash_dir)
        serial_out, close_fd = _serial_sink(serial)
        serial_in = 0 if serial == "stdio" and sys.stdin.isatty() and not os.environ.get("CI") else None
        try:
            with VM(kernel, mem=ram, cpus=vcpus, cmdline=cmdline, initrd=initrd, console=serial_out, capture=False,
                    serial_input=serial_in, timeout=timeout, exit_port=exit_port_n, irqchip=irqchip,
                    trace_io=trace_io, strict_io=strict_io, load_addr=flat_addr, entry_mode=int(entry_mode),
                    crash_dir=None if no_dump else crash_dir, trust=trust, restart_intensity=intensity,
                    restart_period=period, on_device_failure=on_device_failure, bus=bus, disks=disks,
                    sandbox=sandbox == "on", numa=nodes.as_json() if nodes is not None else None,
                    memory_log=memory_log, devices=extra_devices, cpu=cpu_model, display=display,
                    start=False) as vm:
                stub = None
                if gdb_spec:
                    from .machine import gdbstub

                    stub = gdbstub.start(vm.machine, gdb_spec, gdb_wait)
                try:
                    status = _run_vm(vm, control_path, trace_io, debug)
                finally:
                    if stub is not None:
                        stub.close()
        finally:
            if close_fd is not None:
                os.close(close_fd)
        _leave(status)

    _guard(go, debug)


def _run_vm(vm, control_path: str | None, trace_io: bool, debug: bool) -> int:
    """Run a built VM on this thread with the host hooks (SIGUSR1 dumps, --control), report, return its status."""
    import signal

    # `pykvm dump PID` (SIGUSR1): write a core of the running guest and keep going
    signal.signal(signal.SIGUSR1, lambda *_: vm.request_dump())
    if control_path:
        vm.serve_control(control_path)
    outcome = vm.run()               # the control socket closes when the run ends
    policy_line = vm.policy_summary
    if policy_line:
        click.echo(policy_line, err=True)
    if trace_io and vm.unclaimed_io:
        for (kind, addr, rw), n in sorted(vm.unclaimed_io.items()):
            click.echo(f"pykvm: unclaimed {kind} {addr:#x} {rw}: {n}x", err=True)
        unclaimed = vm.machine.devices.unclaimed
        if unclaimed.other:
            click.echo(f"pykvm: unclaimed elsewhere: {unclaimed.other}x "
                       f"({unclaimed.evicted} addresses not listed)", err=True)
    if outcome.kind not in ("exit", "poweroff"):
        click.echo(f"pykvm: {outcome.reason}", err=True)
        if debug and "traceback" in outcome.details:
            click.echo(outcome.details["traceback"], err=True)
    if outcome.core_path:
        hint = f" --kernel {outcome.kernel}" if outcome.kernel and outcome.kernel.suffix == ".elf" else ""
        click.echo(f"pykvm: core written to {outcome.core_path} (inspect: pykvm inspect {outcome.core_path}{hint})",
                   err=True)
    elif outcome.core_error:
        click.echo(f"pykvm: no core written: {outcome.core_error}", err=True)
    return outcome.status


def _leave(status: int) -> None:
    """Exit with the guest's status; from the `pykvm` command, skip interpreter teardown (~30 ms).

    By now the machine is closed and every file it wrote is closed; only Python's own
    stdio buffers remain, flushed here. In-process callers (tests, scripts) get SystemExit.
    """
    if not _fast_exit:
        sys.exit(status)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(status)


def _check_crash_dir(crash_dir: str) -> None:
    """Refuse at start a --crash-dir a core could not be written to (not only when the guest crashes)."""
    from .crash.core import CoreWriteError, check_crash_dir

    try:
        check_crash_dir(crash_dir)
    except CoreWriteError as e:
        raise OutputPathError(f"--crash-dir: {e} (or --no-dump)") from None


def _serial_sink(spec: str):
    """(fd for guest serial output or None, fd to close afterwards or None)."""
    if spec == "stdio":
        return 1, None
    if spec == "none":
        return None, None
    try:
        fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputPathError(f"--serial {spec}: cannot open for writing: {e.strerror}") from None
    return fd, fd


@main.command()
@click.argument("state_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--serial", default="stdio", show_default=True,
              help="Where COM1 output goes: stdio, none, or a file path.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop the guest after this many seconds.")
@click.option("--crash-dir", default="crashes", show_default=True, type=click.Path(file_okay=False),
              help="Where crash cores are written.")
@click.option("--no-dump", is_flag=True, help="Do not write a core when the guest crashes or hangs.")
@click.option("--control", "control_path", type=click.Path(dir_okay=False),
              help="Serve host commands (pykvm ctl) on this unix socket while the guest runs.")
@click.option("--sandbox", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Confine the VMM with seccomp once set up (off: for debugging).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def restore(state_file, serial, timeout, crash_dir, no_dump, control_path, sandbox, debug):
    """Continue a VM saved with `pykvm ctl SOCK save path=STATE_FILE` (exit status 26: bad state file)."""

    def go():
        from .api import VM
        from .machine.state import load_state

        saved = load_state(state_file)
        if not no_dump:
            _check_crash_dir(crash_dir)
        try:
            serial_out, close_fd = _serial_sink(serial)
        except BaseException:
            saved.close()
            raise
        serial_in = 0 if serial == "stdio" and sys.stdin.isatty() and not os.environ.get("CI") else None
        try:
            with VM.restore(saved, console=serial_out, capture=False, serial_input=serial_in, timeout=timeout,
                            crash_dir=None if no_dump else crash_dir, sandbox=sandbox == "on", start=False) as vm:
                status = _run_vm(vm, control_path, False, debug)
        finally:
            if close_fd is not None:
                os.close(close_fd)
        _leave(status)

    _guard(go, debug)


@main.command()
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def info(debug):
    """Show the KVM capabilities pykvm relies on, with a verdict."""

    def go():
        from .kvm import Kvm
        from .kvm import constants as C

        needed = [("KVM_CAP_USER_MEMORY", True), ("KVM_CAP_SET_TSS_ADDR", True), ("KVM_CAP_EXT_CPUID", True),
                  ("KVM_CAP_IMMEDIATE_EXIT", True), ("KVM_CAP_SPLIT_IRQCHIP", True), ("KVM_CAP_MP_STATE", True),
                  ("KVM_CAP_IRQCHIP", False), ("KVM_CAP_PIT2", False), ("KVM_CAP_IOEVENTFD", False),
                  ("KVM_CAP_IRQFD", False), ("KVM_CAP_COALESCED_MMIO", False), ("KVM_CAP_READONLY_MEM", False),
                  ("KVM_CAP_SET_GUEST_DEBUG", False), ("KVM_CAP_NR_VCPUS", False), ("KVM_CAP_MAX_VCPUS", False)]
        with Kvm.open(os.environ.get("PYKVM_DEV_KVM", "/dev/kvm")) as kvm:
            click.echo(f"/dev/kvm: API version {kvm.api_version()}, vCPU mmap size {kvm.vcpu_mmap_size()}")
            missing = []
            for name, required in needed:
                value = kvm.check_extension(getattr(C, name))
                tag = "required" if required else "optional"
                click.echo(f"  {name:28} {value:>6}  ({tag})")
                if required and not value:
                    missing.append(name)
            cpuid = kvm.supported_cpuid()
            click.echo(f"  supported CPUID entries      {cpuid.nent:>6}")
        if missing:
            click.echo(f"verdict: NOT usable: missing {', '.join(missing)}")
            sys.exit(EXIT_KVM_UNAVAILABLE)
        click.echo("verdict: OK: pykvm can run guests on this host")

    _guard(go, debug)


@main.command()
@click.argument("core", type=click.Path(exists=True, dir_okay=False))
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), help="The guest's ELF, for symbols.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def inspect(core, kernel, as_json, debug):
    """Explain a crash core: trigger, registers, code around RIP, backtrace, serial tail."""

    def go():
        from .crash.inspect import build_report, render_text
        from .crash.reader import CoreFormatError

        try:
            report = build_report(core, kernel)
        except CoreFormatError as e:
            raise BadCoreError(str(e)) from None
        if as_json:
            import json

            click.echo(json.dumps(report, indent=2, default=str))
        else:
            click.echo(render_text(report), nl=False)

    _guard(go, debug)


@main.command()
@click.argument("socket_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("command")
@click.argument("args", nargs=-1)
def ctl(socket_path, command, args):
    """Send COMMAND (dump, devices, stats, ...) with KEY=VALUE ARGS to a `pykvm run --control` socket."""
    import json

    from .machine.control import request

    req = {"cmd": command}
    for a in args:
        key, sep, value = a.partition("=")
        if not sep:
            raise click.BadParameter(f"{a!r}: expected KEY=VALUE")
        try:
            req[key] = json.loads(value)
        except ValueError:
            req[key] = value
    try:
        reply = request(socket_path, req)
    except OSError as e:
        click.echo(f"pykvm: error: {socket_path}: {e.strerror or e}", err=True)
        sys.exit(EXIT_USAGE)
    if command == "numa" and reply.get("ok") and not req.get("json"):
        from .machine.numa import render

        click.echo(render(reply), nl=False)
    else:
        click.echo(json.dumps(reply, indent=2))
    sys.exit(0 if reply.get("ok") else 1)


@main.command()
@click.argument("pid", type=int)
def dump(pid):
    """Ask the running `pykvm run` with this PID to write a core without stopping its guest."""
    import signal

    from .vmproc import NotAVmError, signal_vm

    try:
        signal_vm(pid, signal.SIGUSR1)
    except NotAVmError as e:
        click.echo(f"pykvm: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"pykvm: asked process {pid} for a core; it prints the path on its stderr")


@main.command()
@click.option("--describe", "name", metavar="NAME", help="Print one device's registers and what each trust level gets.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def devices(name, debug):
    """List the device types (the default set, and those `run --device NAME` adds); --describe shows one's registers."""

    def go():
        from .devices import description, registry

        table = description.shipped()
        if name is None:
            for line in registry.describe_types():
                click.echo(line.rstrip())
            return
        if name not in table:
            raise UsageError(f"no device description named {name!r}; known: {', '.join(sorted(table))}")
        click.echo(table[name].render(), nl=False)

    _guard(go, debug)


@main.command()
@click.option("--build", "build_only", is_flag=True,
              help="Build the firmware and bundled guests now (into the cache) and say where.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def guests(build_only, debug):
    """List the bundled guests (built from source on first use)."""

    def go():
        from .artifacts import bundled_guests, firmware_path, guests_dir

        if build_only:
            click.echo(f"firmware         {firmware_path()}")
            click.echo(f"guests           {guests_dir()}")
            return
        for name, path in bundled_guests().items():
            click.echo(f"{name:16} {path}")

    _guard(go, debug)


_fast_exit = False


def entry():
    """The `pykvm` command (console script and `python -m pykvm`): main() that may skip teardown."""
    global _fast_exit
    _fast_exit = True
    main()


if __name__ == "__main__":
    entry()


@main.command()
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--dir", "rundir", type=click.Path(file_okay=False), default=None,
              help="Where serial output, control sockets, crash cores and logs go (default: ./up-<topology name>).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def up(topology, rundir, debug):
    """Start the partitions of a TOPOLOGY file (TOML), each its own process, and relay between them."""

    def go():
        from pathlib import Path

        from .partitions import topology as topo_mod
        from .partitions.broker import Broker

        topo = topo_mod.load(topology)
        where = Path(rundir) if rundir else Path(f"up-{Path(topology).stem}")
        broker = Broker(topo, where)
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop the partitions too (finally below)
        try:
            broker.start()
            for p in topo.partitions:
                f = broker.files(p)
                click.echo(f"partition {p.name}: serial {f['serial']}, control {f['control']}, "
                           f"crashes {f['crashes']}, log {f['log']}")
            sys.stdout.flush()
            statuses = broker.run()
        finally:
            broker.close()
        for p in topo.partitions:
            click.echo(f"partition {p.name}: status {statuses.get(p.name)} (restarts {broker.generation[p.name]})")
        click.echo(f"pykvm: up: relayed {broker.counts['relayed']} requests, {broker.counts['resent']} held "
                   f"across a provider's loss, {broker.counts['restarts']} restarts", err=True)
        bad = [statuses.get(p.name) for p in topo.partitions if not p.provides and statuses.get(p.name) != 0]
        _leave(bad[0] if bad and isinstance(bad[0], int) and bad[0] > 0 else (1 if bad else 0))

    _guard(go, debug)
