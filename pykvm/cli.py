"""The `pykvm` command: run guests, report KVM capabilities, inspect crash cores."""

from __future__ import annotations

import os
import sys

import click

from . import runcmd
from .version import __version__
from .errors import EXIT_KVM_UNAVAILABLE, EXIT_USAGE, BadCoreError, UsageError
from .runcmd import check_crash_dir as _check_crash_dir, die_of_sigpipe as _die_of_sigpipe, guard as _guard
from .runcmd import run_vm as _run_vm, serial_sink as _serial_sink
from .units import parse_size  # noqa: F401  (tests and scripts import it from here)


def _usage_exit(e: click.UsageError) -> None:
    """Print a click usage error as one line, like every other pykvm error, and exit with EXIT_USAGE."""
    names, ctx = [], e.ctx
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    where = " ".join(["pykvm", *reversed(names)])
    click.echo(f"pykvm: error: {e.format_message()} (see `{where} --help`)", err=True)
    sys.exit(EXIT_USAGE)


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
      36   unsafe cache directory: not yours, or writable by group/others
      130  interrupted
    """


def _click_option(o: runcmd.Opt):
    """The click option for one row of runcmd.RUN_OPTIONS."""
    kw = {"help": o.help}
    if o.default is not None:
        kw["default"] = o.default
    if o.show_default:
        kw["show_default"] = True
    if o.metavar:
        kw["metavar"] = o.metavar
    if o.flag:
        kw["is_flag"] = True
    if o.multiple:
        kw["multiple"] = True
    if o.kind == "int":
        kw["type"] = int
    elif o.kind == "int-range":
        kw["type"] = click.IntRange(*o.bounds)
    elif o.kind == "float-positive":
        kw["type"] = click.FloatRange(min=0, min_open=True)
    elif o.kind == "choice":
        kw["type"] = click.Choice(list(o.choices))
    elif o.kind == "path":
        exists, file_okay, dir_okay = o.path
        path_kw = {"exists": exists} if exists else {}     # only what differs from click.Path's defaults
        if not file_okay:
            path_kw["file_okay"] = False
        if not dir_okay:
            path_kw["dir_okay"] = False
        kw["type"] = click.Path(**path_kw)
    return click.option(*o.decls, o.dest, **kw)


def _run_options(fn):
    for o in reversed(runcmd.RUN_OPTIONS):
        fn = _click_option(o)(fn)
    return fn


@main.command()
@click.argument("kernel")
@_run_options
def run(**p):
    """Boot KERNEL (a path, or the name of a bundled guest such as `hello`)."""
    try:
        checked = runcmd.check_values(p["exit_port"], p["load_addr"], p["restart_intensity"], p["gdb_wait"],
                                      p["gdb_spec"])
    except runcmd.BadValue as e:
        raise click.BadParameter(e.args[0], param_hint=e.args[1]) from None
    ctx = click.get_current_context()
    given = {name for name in p if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    runcmd.run(p, given, checked, _fast_exit)


def _leave(status: int) -> None:
    runcmd.leave(status, _fast_exit)


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
@click.option("--disk", "disks", multiple=True, metavar="FILE[,ro]",
              help="The saved VM's disks, in their original order (repeat); each must match the saved size and mode.")
@click.option("--trust", type=click.Choice(["trusted", "untrusted"]),
              help="Trust level of the restored VM; a VM saved as trusted needs --trust trusted.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def restore(state_file, serial, timeout, crash_dir, no_dump, control_path, sandbox, disks, trust, debug):
    """Continue a VM saved with `pykvm ctl SOCK save path=STATE_FILE` (exit status 26: bad state file).

    The state file names no host file that is opened: give the saved VM's disks again with
    --disk (checked against the saved size and mode), and its trust with --trust.
    """

    def go():
        from .api import VM
        from .snapshot.state import load_state

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
            with VM.restore(saved, disks=disks, trust=trust, console=serial_out, capture=False,
                            serial_input=serial_in, timeout=timeout,
                            crash_dir=None if no_dump else crash_dir, sandbox=sandbox == "on", start=False) as vm:
                status = _run_vm(vm, control_path, False, debug)
        finally:
            if close_fd is not None:
                os.close(close_fd)
        _leave(status)

    _guard(go, debug)


@main.command()
@click.argument("kernel")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False),
              help="Run this one input outside AFL and end with its status (0 done, 16 crash, 18 hang).")
@click.option("--mem", default="128M", show_default=True, help="Guest RAM (e.g. 64M).")
@click.option("--cpus", type=click.IntRange(1, 255), default=1, show_default=True, help="vCPUs.")
@click.option("--cmdline", default="", help="The kernel command line.")
@click.option("--crash-dir", default="crashes", show_default=True, type=click.Path(file_okay=False),
              help="Where crash cores and the inputs that caused them are written.")
@click.option("--no-dump", is_flag=True, help="Write no cores.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="With --input (or one input from stdin under afl-showmap): seconds before the run counts "
                   "as a hang (under afl-fuzz, afl-fuzz -t decides).")
@click.option("--boot-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds the guest has to reach its \"snapshot here\" call.")
@click.option("--sandbox", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Confine the VMM with seccomp once set up (off: for debugging).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def fuzz(kernel, input_file, mem, cpus, cmdline, crash_dir, no_dump, timeout, boot_timeout, sandbox, debug):
    """Fuzz KERNEL with AFL++: afl-fuzz -i SEEDS -o OUT -- pykvm fuzz KERNEL.

    \b
    The guest takes the snapshot when ready and runs one input per reset (pykvm_abi.h,
    PYKVM_PORT_FUZZ); its trace-pc coverage lands in AFL's map. Each distinct crash leaves
    a core in --crash-dir with the input beside it (named in the core: pykvm inspect).
    Under afl-fuzz set AFL_SKIP_BIN_CHECK=1 (the target is not an instrumented ELF) and
    allow for the boot with AFL_FORKSRV_INIT_TMOUT (ms).
    """
    from .fuzz import driver

    def go():
        crash = None if no_dump else crash_dir
        if crash is not None:
            os.makedirs(crash, exist_ok=True)
            _check_crash_dir(crash)
        size = parse_size(mem)
        opts = dict(mem=size, cpus=cpus, cmdline=cmdline, crash_dir=crash, boot_timeout=boot_timeout,
                    sandbox=sandbox == "on")
        if input_file is not None:
            status = driver.reproduce(kernel, input_file, timeout, **opts)
        else:
            status = driver.under_afl(kernel, timeout=timeout, **opts)
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

    from .control.client import request

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
    """List the device types (the default set, and those `run --device NAME` adds) and the machine presets
    (`run --machine NAME`); --describe shows one device's registers."""

    def go():
        from .devices import description, registry

        table = description.shipped()
        if name is None:
            for line in registry.describe_types():
                click.echo(line.rstrip())
            click.echo("\nmachine presets (run --machine NAME; --device adds to them):")
            for line in registry.describe_presets():
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
        from .startup.artifacts import bundled_guests, firmware_path, guests_dir

        if build_only:
            click.echo(f"firmware         {firmware_path()}")
            click.echo(f"guests           {guests_dir()}")
            return
        for name, path in bundled_guests().items():
            click.echo(f"{name:16} {path}")

    _guard(go, debug)


_fast_exit = False


@main.command()
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--dir", "rundir", type=click.Path(file_okay=False), default=None,
              help="Where serial output, control sockets, crash cores and logs go (default: ./up-<topology name>).")
@click.option("--restart-intensity", "restart_intensity", default="5/60", show_default=True,
              help="Restarts of one crashed partition allowed per period (N/SECONDS), on top of its `restarts`.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def up(topology, rundir, restart_intensity, debug):
    """Start the partitions of a TOPOLOGY file (TOML), each its own process, and relay between them."""
    try:
        intensity = runcmd.parse_intensity(restart_intensity)
    except runcmd.BadValue as e:
        raise click.BadParameter(e.args[0], param_hint=e.args[1]) from None

    def go():
        from pathlib import Path

        from .partitions import topology as topo_mod
        from .partitions.broker import Broker

        topo = topo_mod.load(topology)
        where = Path(rundir) if rundir else Path(f"up-{Path(topology).stem}")
        broker = Broker(topo, where, intensity=intensity)
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
        click.echo(f"pykvm: up: relayed {broker.counts['relayed']} requests, {broker.counts['rescinds']} provider "
                   f"losses (offers rescinded, {broker.counts['failed']} requests failed), "
                   f"{broker.counts['restarts']} restarts, "
                   f"{broker.counts['remapped']} remapped ({broker.counts['remap_declined']} declined), "
                   f"{broker.counts['policy_refused']} refused by policy (see {broker.status_path})", err=True)
        bad = [statuses.get(p.name) for p in topo.partitions if not p.provides and statuses.get(p.name) != 0]
        _leave(bad[0] if bad and isinstance(bad[0], int) and bad[0] > 0 else (1 if bad else 0))

    _guard(go, debug)


def entry():
    """The `pykvm` command through click (pykvm.__main__.entry() comes here for all but a plain `run`)."""
    global _fast_exit
    _fast_exit = True
    main()


if __name__ == "__main__":
    entry()
