"""`pykvm run`'s options and body, importable without click, and its fast path.

Importing click and building the command group costs ~20-30 ms of every `pykvm run`, more
than a small guest takes to run. fast_run() (which pykvm.__main__.entry() tries first)
therefore parses a plain `pykvm run ...` itself from RUN_OPTIONS (the table cli.py builds the
click options from, so help and parsing share one source) and hands anything it is not
certain click would accept unchanged (--help, an unknown or repeated option, a value click
would refuse or convert differently, `--`, short option clusters, a failed check) to click,
so every message and exit status stays click's.
"""

from __future__ import annotations

import os
import stat
import sys

from .devices.description import TRUST_LEVELS
from .errors import EXIT_KVM_UNAVAILABLE, EXIT_VMM_ERROR, OutputPathError, PykvmError
from .record import record
from .units import parse_size


@record(frozen=True)
class Opt:
    """One `pykvm run` option: its click declaration, as data."""

    decls: tuple            # option strings, long first, e.g. ("--mem", "-m")
    dest: str               # the run() parameter it fills
    help: str
    default: object = None
    show_default: bool = False
    metavar: str | None = None
    flag: bool = False
    multiple: bool = False
    kind: str = "str"       # str, int, int-range, float-positive, choice, path
    choices: tuple = ()
    bounds: tuple = ()      # int-range: (min, max), both inclusive
    path: tuple = ()        # path: (exists, file_okay, dir_okay)


RUN_OPTIONS = (
    Opt(("--mem", "-m"), "mem", "Guest RAM, e.g. 64M, 1G (bare number = MiB).", default="128M", show_default=True),
    Opt(("--cpus", "-c"), "cpus", "Number of vCPUs.", default=1, show_default=True, kind="int-range", bounds=(1, 255)),
    Opt(("--cmdline", "-a"), "cmdline", "Kernel command line.", default=""),
    Opt(("--initrd",), "initrd", "File passed as multiboot module 0 / initrd.", kind="path",
        path=(True, True, False)),
    Opt(("--serial",), "serial", "Where COM1 output goes: stdio, none, or a file path.", default="stdio",
        show_default=True),
    Opt(("--timeout",), "timeout", "Stop the guest after this many seconds.", kind="float-positive"),
    Opt(("--exit-port",), "exit_port", "isa-debug-exit port.", default="0xf4", show_default=True),
    Opt(("--irqchip",), "irqchip", "split: LAPIC in kernel; full: also IOAPIC, PIC and PIT in kernel (slower to "
        "create).", default="split", show_default=True, kind="choice", choices=("split", "full")),
    Opt(("--trace-io",), "trace_io", "Print accesses to ports/MMIO no device claims.", flag=True),
    Opt(("--strict-io",), "strict_io", "Treat accesses to unclaimed ports/MMIO as a guest crash.", flag=True),
    Opt(("--load-addr",), "load_addr", "Treat KERNEL as a flat binary loaded (and entered) here."),
    Opt(("--entry-mode",), "entry_mode", "CPU mode for flat binaries.", default="64", show_default=True,
        kind="choice", choices=("64", "32", "16")),
    Opt(("--crash-dir",), "crash_dir", "Where crash cores are written.", default="crashes", show_default=True,
        kind="path", path=(False, False, True)),
    Opt(("--no-dump",), "no_dump", "Do not write a core when the guest crashes or hangs.", flag=True),
    Opt(("--control",), "control_path", "Serve host commands (pykvm ctl) on this unix socket while the guest runs.",
        kind="path", path=(False, True, False)),
    Opt(("--restart-intensity",), "restart_intensity",
        "Device restarts allowed per period (N/SECONDS) before a failure escalates.", default="5/60",
        show_default=True),
    Opt(("--on-device-failure",), "on_device_failure",
        "Past the restart intensity: surprise-remove the device, or stop the VM with a core.", default="remove",
        show_default=True, kind="choice", choices=("remove", "crash")),
    Opt(("--trust",), "trust", "Device access policy level (see `pykvm devices --describe NAME`).",
        default="trusted", show_default=True, kind="choice", choices=TRUST_LEVELS),
    Opt(("--bus",), "bus", "Give the guest a partition bus (echo, shutdown, heartbeat services).", flag=True),
    Opt(("--disk",), "disks", "A raw disk image served by the bus's block service (implies --bus); repeatable.",
        metavar="FILE[,ro]", multiple=True),
    Opt(("--sandbox",), "sandbox", "Confine the VMM with seccomp once set up (off: for debugging).", default="on",
        show_default=True, kind="choice", choices=("on", "off")),
    Opt(("--gdb",), "gdb_spec",
        "Serve gdb's remote protocol here (gdb: target remote :PORT); port 0 picks a free one.",
        metavar="tcp::PORT|unix:PATH"),
    Opt(("--gdb-wait",), "gdb_wait", "With --gdb: run no guest code until gdb connects and continues.", flag=True),
    Opt(("--numa-node",), "numa_nodes",
        "A virtual NUMA node (repeat per node); implies the dynamic memory service on the bus.",
        metavar="mem=SIZE,cpus=A-B[,min=,max=,hotadd=,buffer=PCT]", multiple=True),
    Opt(("--numa",), "numa_count", "Split --mem and --cpus evenly into N virtual NUMA nodes.", metavar="N",
        kind="int"),
    Opt(("--numa-distance",), "numa_distance",
        "Node distances: rows '10,21;21,10' or pairs '0-1=21' (default 10 local, 20 remote).", metavar="MATRIX"),
    Opt(("--memory-max",), "memory_max", "vNUMA: most RAM the balancer gives the VM in total.", metavar="SIZE"),
    Opt(("--memory-log",), "memory_log",
        "vNUMA: write the dynamic memory timeline here as JSON lines (chart: scripts/memory_chart.py).",
        kind="path", path=(False, True, False)),
    Opt(("--machine",), "machine", "Machine preset: minimal (the default set) or pc (adds the PIC, PIT, IOAPIC, RTC, "
        "ACPI PM and i8042); --device adds to it; `pykvm devices` lists the presets.", default="minimal",
        show_default=True, metavar="minimal|pc"),
    Opt(("--device",), "device_specs", "Add a device beyond the default set (repeatable; `pykvm devices` lists "
        "them).", metavar="NAME[,key=value...]", multiple=True),
    Opt(("--cpu",), "cpu_model", "CPU model: the host's, with CPUID features added or hidden (QEMU/Linux names: "
        "x2apic, cx16, ...).", default="host", show_default=True, metavar="host[,+FEAT,-FEAT...]"),
    Opt(("--display",), "display", "text: show the guest's 80x25 VGA text screen (0xb8000) in the terminal.",
        default="none", show_default=True, kind="choice", choices=("none", "text")),
    Opt(("--debug",), "debug", "Show tracebacks for errors.", flag=True),
)


class BadValue(Exception):
    """A run option value the checks below refuse: (message, option to name or None)."""


def check_values(exit_port: str, load_addr: str | None, restart_intensity: str, gdb_wait: bool,
                 gdb_spec: str | None) -> tuple[int, int | None, int, float]:
    """(exit port, flat load address, restart intensity, period) checked; BadValue names the problem."""
    exit_port_n = _int(exit_port)
    if not 0 <= exit_port_n <= 0xFFFC:
        raise BadValue(f"{exit_port} is not an I/O port", "--exit-port")
    flat_addr = _int(load_addr) if load_addr is not None else None
    intensity, period = parse_intensity(restart_intensity)
    if gdb_wait and not gdb_spec:
        raise BadValue("needs --gdb", "--gdb-wait")
    return exit_port_n, flat_addr, intensity, period


def parse_intensity(text: str) -> tuple[int, float]:
    """(N, SECONDS) of a --restart-intensity value N/SECONDS; BadValue names the problem."""
    # The plain form (the default among them) without compiling the pattern, ~0.14 ms a run;
    # it accepts a subset of what the pattern does and reads it the same way.
    n, _slash, secs = text.partition("/")
    if 0 < len(n) <= 9 and 0 < len(secs) <= 9 and (n + secs).isascii() and n.isdigit() and secs.isdigit() \
            and int(secs) > 0:
        return int(n), float(secs)
    import re

    m = re.fullmatch(r"\s*(\d{1,9})\s*/\s*(\d{1,9}(?:\.\d+)?)\s*", text)
    if not m or float(m.group(2)) <= 0:
        raise BadValue(f"{text!r}: expected N/SECONDS, e.g. 5/60", "--restart-intensity")
    return int(m.group(1)), float(m.group(2))


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise BadValue(f"{text!r} is not a number (decimal or 0x-prefixed hex)", None) from None


# ---------------------------------------------------------------- output and errors, as click would print them
def echo(message: str, err: bool = False) -> None:
    """click.echo(message, err=err) without click: ANSI sequences dropped unless the stream is a terminal."""
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    out = message + "\n"
    if "\033" in out and not _isatty(stream):
        import re   # only for a message with escapes: a plain run (maybe sandboxed by now) never loads re

        out = re.sub(r"\033\[[;?0-9]*[a-zA-Z]", "", out)
    stream.write(out)
    stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except Exception:
        return False


def _fail(e: BaseException, debug: bool, status: int) -> None:
    if debug:
        import traceback

        traceback.print_exception(e)
    echo(f"pykvm: error: {e}", err=True)
    sys.exit(status)


def _KvmUnavailable():
    """KvmUnavailable if the KVM bindings were imported (else nothing can raise it: don't load them for it)."""
    mod = sys.modules.get(f"{__package__}.kvm.errors")
    return mod.KvmUnavailable if mod else ()


def _passed_through():
    """Exceptions guard() lets through: click's Exit only if click is loaded (else nothing raises it)."""
    click_exc = sys.modules.get("click.exceptions")
    return (click_exc.Exit, BrokenPipeError) if click_exc else (BrokenPipeError,)


def guard(fn, debug: bool):
    """Run fn, turning known errors into one line and a distinct status (traceback only with --debug)."""
    try:
        return fn()
    except PykvmError as e:
        _fail(e, debug, e.exit_status)
    except _KvmUnavailable() as e:
        _fail(e, debug, EXIT_KVM_UNAVAILABLE)
    except _passed_through():
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a pykvm bug: say so, keep the status distinct
        if not debug:
            echo(f"pykvm: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", err=True)
            sys.exit(EXIT_VMM_ERROR)
        _fail(e, debug, EXIT_VMM_ERROR)


def die_of_sigpipe() -> None:
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


# ---------------------------------------------------------------- the command's body
def run(p: dict, given: set, checked: tuple, fast_exit: bool) -> None:
    """Boot and run the VM `pykvm run` describes (p: option values by dest; given: dests set on the command line)."""
    exit_port_n, flat_addr, intensity, period = checked
    debug = p["debug"]

    def go():
        from .api import VM, device_spec

        extra_devices = [device_spec(spec) for spec in p["device_specs"]]    # bad specs: one line, status 10
        size = parse_size(p["mem"])
        nodes = None
        if p["numa_nodes"] or p["numa_count"] is not None or p["numa_distance"] is not None or p["memory_max"]:
            from .memory import numa as numa_spec   # a plain run does not need it

            nodes = numa_spec.from_options(p["numa_nodes"], p["numa_count"], p["numa_distance"],
                                           size if "mem" in given else None, p["cpus"] if "cpus" in given else None,
                                           numa_spec.parse_size(p["memory_max"], "--memory-max")
                                           if p["memory_max"] else None)
        vcpus, ram = p["cpus"], size
        if nodes is not None:
            vcpus, ram = nodes.cpus, nodes.mem
        no_dump, crash_dir, serial = p["no_dump"], p["crash_dir"], p["serial"]
        if not no_dump:
            check_crash_dir(crash_dir)
        serial_out, close_fd = serial_sink(serial)
        serial_in = 0 if serial == "stdio" and sys.stdin.isatty() and not os.environ.get("CI") else None
        try:
            with VM(p["kernel"], mem=ram, cpus=vcpus, cmdline=p["cmdline"], initrd=p["initrd"], console=serial_out,
                    capture=False, serial_input=serial_in, timeout=p["timeout"], exit_port=exit_port_n,
                    irqchip=p["irqchip"], trace_io=p["trace_io"], strict_io=p["strict_io"], load_addr=flat_addr,
                    entry_mode=int(p["entry_mode"]), crash_dir=None if no_dump else crash_dir, trust=p["trust"],
                    restart_intensity=intensity, restart_period=period,
                    on_device_failure=p["on_device_failure"], bus=p["bus"], disks=p["disks"],
                    sandbox=p["sandbox"] == "on", numa=nodes.as_json() if nodes is not None else None,
                    memory_log=p["memory_log"], devices=extra_devices, machine=p["machine"], cpu=p["cpu_model"],
                    display=p["display"], start=False) as vm:
                stub = None
                if p["gdb_spec"]:
                    from .gdb import stub as gdbstub

                    stub = gdbstub.start(vm.machine, p["gdb_spec"], p["gdb_wait"])
                try:
                    status = run_vm(vm, p["control_path"], p["trace_io"], debug)
                finally:
                    if stub is not None:
                        stub.close()
        finally:
            if close_fd is not None:
                os.close(close_fd)
        leave(status, fast_exit)

    guard(go, debug)


def run_vm(vm, control_path: str | None, trace_io: bool, debug: bool) -> int:
    """Run a built VM on this thread with the host hooks (SIGUSR1 dumps, --control), report, return its status."""
    import signal

    from .vmproc import announce, drain

    _resume_gc()
    # `pykvm dump PID` (SIGUSR1, once vmproc proved this is a VM): write a core and keep going
    announced = announce()
    signal.signal(signal.SIGUSR1, lambda *_: (vm.request_dump(), drain(announced)))
    if control_path:
        vm.serve_control(control_path)
    try:
        outcome = vm.run()           # the control socket closes when the run ends
    finally:
        if announced is not None:
            announced.close()
    policy_line = vm.policy_summary
    if policy_line:
        echo(policy_line, err=True)
    if trace_io and vm.unclaimed_io:
        for (kind, addr, rw), n in sorted(vm.unclaimed_io.items()):
            echo(f"pykvm: unclaimed {kind} {addr:#x} {rw}: {n}x", err=True)
        unclaimed = vm.machine.devices.unclaimed
        if unclaimed.other:
            echo(f"pykvm: unclaimed elsewhere: {unclaimed.other}x ({unclaimed.evicted} addresses not listed)",
                 err=True)
    if outcome.kind not in ("exit", "poweroff"):
        echo(f"pykvm: {outcome.reason}", err=True)
        if debug and "traceback" in outcome.details:
            echo(outcome.details["traceback"], err=True)
    core, kernel = outcome.core_file, outcome.kernel_file   # str: a run never builds a pathlib.Path
    if core:
        from .paths import shell_word as quote   # the kernel's name may come from a state file

        hint = f" --kernel {quote(kernel)}" if kernel and os.path.splitext(kernel)[1] == ".elf" else ""
        echo(f"pykvm: core written to {core} (inspect: pykvm inspect {quote(core)}{hint})",
             err=True)
    elif outcome.core_error:
        echo(f"pykvm: no core written: {outcome.core_error}", err=True)
    return outcome.status


_gc_paused = [False]


def _pause_gc() -> None:
    """No cyclic garbage collection while the VM is set up (the `pykvm run` command only).

    Importing the VMM and building the VM allocate some hundred thousand objects that live
    as long as the process, and almost no cyclic garbage; the collector's passes over them
    cost ~3 ms of every run. _resume_gc() turns it back on before the guest runs.
    """
    import gc

    if gc.isenabled():
        gc.disable()
        _gc_paused[0] = True


def _resume_gc() -> None:
    """Collect again from here on, never walking the set-up's objects (frozen: they stay for good)."""
    if _gc_paused[0]:
        import gc

        _gc_paused[0] = False
        gc.freeze()     # without it, the first young-generation pass would walk everything set-up made
        gc.enable()


def leave(status: int, fast_exit: bool) -> None:
    """Exit with the guest's status; from the `pykvm` command, skip interpreter teardown (~30 ms).

    By now the machine is closed and every file it wrote is closed; only Python's own
    stdio buffers remain, flushed here. In-process callers (tests, scripts) get SystemExit.
    """
    if not fast_exit:
        sys.exit(status)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    sandbox = sys.modules.get("pykvm.sandbox")
    if sandbox is not None:
        sandbox.release()       # an unused crash directory is gone before our parent sees us end (atexit is skipped)
    os._exit(status)


def check_crash_dir(crash_dir: str) -> None:
    """Refuse at start a --crash-dir a core could not be written to (not only when the guest crashes)."""
    from .crash.crashdir import CoreWriteError, check_crash_dir as check

    try:
        check(crash_dir)
    except CoreWriteError as e:
        raise OutputPathError(f"--crash-dir: {e} (or --no-dump)") from None


def serial_sink(spec: str):
    """(fd for guest serial output or None, fd to close afterwards or None)."""
    if spec == "stdio":
        return 1, None
    if spec == "none":
        return None, None
    try:
        # 0600 when created: what a guest prints is the user's (an existing file keeps its mode)
        fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise OutputPathError(f"--serial {spec}: cannot open for writing: {e.strerror}") from None
    return fd, fd


# ---------------------------------------------------------------- the fast path
_BY_NAME = {d: o for o in RUN_OPTIONS for d in o.decls}


def parse(args: list[str]) -> tuple[dict, set] | None:
    """`pykvm run` arguments as (values by dest, dests given), or None for anything click must handle."""
    values = {o.dest: (() if o.multiple else False if o.flag else o.default) for o in RUN_OPTIONS}
    given: set[str] = set()
    kernel = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-"):
            if kernel is not None:
                return None                     # an extra argument: click's error
            kernel = arg
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        opt = _BY_NAME.get(name)
        if opt is None:
            return None                         # --help, --, -m64M, unknown options...
        if opt.flag:
            if eq:
                return None
            value = True
        elif not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        if opt.dest in given and not opt.multiple:
            return None                         # repeated: let click decide which wins
        if not opt.flag:
            if value.startswith("-"):
                return None
            value = _convert(opt, value)
            if value is None:
                return None
        given.add(opt.dest)
        values[opt.dest] = values[opt.dest] + (value,) if opt.multiple else value
    if kernel is None:
        return None
    values["kernel"] = kernel
    return values, given


def _convert(opt: Opt, value: str):
    """The value click would pass for this option, or None where click might refuse or differ."""
    if opt.kind == "str":
        return value
    if opt.kind in ("int", "int-range"):
        if not value.isascii() or not value.isdigit():
            return None
        n = int(value)
        if opt.bounds and not opt.bounds[0] <= n <= opt.bounds[1]:
            return None
        return n
    if opt.kind == "float-positive":
        import re

        if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", value):
            return None
        f = float(value)
        return f if f > 0 else None
    if opt.kind == "choice":
        return value if value in opt.choices else None
    if opt.kind == "path":
        return value if _path_ok(value, *opt.path) else None
    return None


def _path_ok(value: str, exists: bool, file_okay: bool, dir_okay: bool) -> bool:
    """Whether click.Path(exists, file_okay, dir_okay) surely accepts value as it is."""
    if not value:
        return False
    if "\0" in value:      # no such path exists; let click say so (argv cannot carry one, an API caller can)
        return False
    try:
        st = os.stat(value)
    except OSError:
        return not exists
    if not file_okay and stat.S_ISREG(st.st_mode):
        return False
    if not dir_okay and stat.S_ISDIR(st.st_mode):
        return False
    return os.access(value, os.R_OK)


def fast_run(argv: list[str]) -> bool:
    """Run `pykvm run ...` without click when argv is one it surely accepts; False to let click handle it."""
    if not argv or argv[0] != "run":
        return False
    parsed = parse(argv[1:])
    if parsed is None:
        return False
    p, given = parsed
    try:
        checked = check_values(p["exit_port"], p["load_addr"], p["restart_intensity"], p["gdb_wait"], p["gdb_spec"])
    except BadValue:
        return False
    _pause_gc()
    try:
        try:
            run(p, given, checked, fast_exit=True)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        die_of_sigpipe()
    return True
