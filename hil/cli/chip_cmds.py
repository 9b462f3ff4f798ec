"""CLI commands of the drivers area: ``hil serve-virtual-chip`` serves any backend URL as a
test chip over SCPI (TCP) or the framed serial protocol (TCP or a pty), with fault injection."""

from __future__ import annotations

import time

import typer

from hil.cli import app


@app.command("serve-virtual-chip")
def serve_virtual_chip(
    backend: str = typer.Option("sim://", "--backend", help="Backend URL the chip emulates."),
    port: int | None = typer.Option(None, "--port", min=0, max=65535,
                                    help="Listen on 127.0.0.1:PORT (0: any free port)."),
    pty: bool = typer.Option(False, "--pty", help="Serve on a new pseudo-terminal instead."),
    protocol: str = typer.Option("", "--protocol",
                                 help="scpi or serial (default: scpi on TCP, serial on a pty)."),
    profile: str = typer.Option("virtual", "--profile", help="Profile name or YAML path."),
    drop: float = typer.Option(0.0, "--drop", min=0.0, max=0.99,
                               help="Fraction of replies to drop."),
    corrupt: float = typer.Option(0.0, "--corrupt", min=0.0, max=0.99,
                                  help="Fraction of CRC-checked replies to corrupt."),
    delay: float = typer.Option(0.0, "--delay", min=0.0, help="Seconds to delay replies."),
    delay_fraction: float = typer.Option(1.0, "--delay-fraction", min=0.0, max=1.0,
                                         help="Fraction of replies delayed by --delay."),
    close_after: int | None = typer.Option(None, "--close-after", min=1,
                                           help="Drop the connection after command N (once)."),
    fault_seed: int = typer.Option(0, "--fault-seed", help="Seed of the fault injection."),
    duration: float | None = typer.Option(None, "--duration", min=0.0,
                                          help="Stop after this many seconds (default: Ctrl-C)."),
    station: str | None = typer.Option(
        None, "--station", help="Serve a station profile's simulated SMU and matrix instead "
        "(VISA TCPIP SOCKET resources; --port is the SMU's, each matrix frame's the next)."),
) -> None:
    """Serve BACKEND as a virtual crossbar test chip until Ctrl-C; prints the URL to open."""
    from drivers.virtual_chip import Faults, VirtualChip
    from hil import interrupts
    from hil.errors import ConfigError

    if station is not None:
        _serve_station(station, backend, port, duration)
        return

    if pty == (port is not None):
        raise ConfigError("serve-virtual-chip", "--port/--pty", "give exactly one of them")
    transport = "pty" if pty else "tcp"
    protocol = protocol or ("serial" if pty else "scpi")
    if protocol not in ("scpi", "serial"):
        raise ConfigError("serve-virtual-chip", "--protocol", "must be scpi or serial")
    faults = Faults(drop=drop, corrupt=corrupt, delay_s=delay, delay_fraction=delay_fraction,
                    close_after=close_after, seed=fault_seed)
    try:
        chip = VirtualChip(backend, protocol, transport, faults, profile, port=port or 0)
    except OSError as exc:  # the port is in use, or no pty can be had
        where = f"127.0.0.1:{port}" if port is not None else "a new pty"
        raise ConfigError("serve-virtual-chip", "--port" if port is not None else "--pty",
                          f"cannot serve on {where}: {exc.strerror or exc}") from None
    try:
        typer.echo(chip.url, err=False)
        typer.echo(f"virtual chip ({protocol} on {chip.address}) serving {backend}; "
                   "Ctrl-C stops it", err=True)
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupts.consume()  # Ctrl-C, SIGTERM or SIGHUP: the server's normal stop
    finally:
        chip.close()
        fw = chip.firmware
        typer.echo(f"stopped: {fw.device_pulses} device-pulses applied, outputs "
                   f"{'on' if fw.outputs else 'off'}", err=True)


def _serve_station(name: str, backend: str, port: int | None, duration: float | None) -> None:
    """The simulated instruments of a station profile on loopback sockets until Ctrl-C."""
    from drivers.station.backend import station_interlock
    from drivers.station.profile import load_station_profile
    from drivers.station.sim.server import StationServer

    profile = load_station_profile(name)
    station_interlock(profile)
    server = StationServer(profile, name, backend, port or 0)
    try:
        for which, resource in server.resources.items():
            typer.echo(f"{which}: {resource}", err=True)
        typer.echo(server.url)
        typer.echo(f"simulated {profile.dialect} station serving {backend}; Ctrl-C stops it",
                   err=True)
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        clock = server.sim.clock
        typer.echo(f"stopped: {server.sim.chip.device_pulses} device-pulses, modelled "
                   f"instrument time {clock.seconds:.3f} s", err=True)
