"""Write-verify programming: converges on non-ideal devices, honours the mask, reports honestly."""

from __future__ import annotations

import torch

import hil

URL = "sim://?model=power&gamma=0.5&tau=0.6&dw_min=2e-3&d2d=0.3&c2c=0.1&engine=eager&seed=5"


def test_program_converges_to_per_device_targets():
    with hil.open_backend(URL) as be:
        tile = be.allocate("t", 24, 24)
        dev = tile.devices
        g = torch.Generator().manual_seed(0)
        lo, hi = dev.tau_min * 0.7, dev.tau_max * 0.7
        target = lo + (hi - lo) * torch.rand(24, 24, generator=g)
        target = torch.where(dev.stuck if dev.stuck is not None else target != target,
                             tile.read(), target)
        res = hil.program(tile, target, tol=4e-3)
        assert res.fraction_converged == 1.0
        assert float((tile.read() - target).abs().max()) <= 4e-3
        assert res.pulses > 0 and 0 < res.iterations < 100
        assert torch.equal(res.error, tile.read() - target)


def test_program_with_read_noise_and_scalar_target():
    with hil.open_backend(URL + "&read_noise=5e-4") as be:
        tile = be.allocate("t", 16, 16)
        res = hil.program(tile, 0.1, tol=3e-3)
        assert res.fraction_converged > 0.98
        assert abs(float(tile.devices.w0.mean())) < 1e-6  # init stays untouched
        assert float((be.tile("t").w - 0.1).abs().median()) < 3e-3


def test_program_leaves_masked_devices_alone_and_reports_unreachable_targets():
    with hil.open_backend(URL) as be:
        tile = be.allocate("t", 8, 8)
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[:4] = True
        w0 = tile.read()
        target = torch.full((8, 8), 0.05)
        target[0, 0] = 5.0  # beyond tau_max: never reachable
        res = hil.program(tile, target, tol=4e-3, max_iter=30, mask=mask)
        assert torch.equal(tile.read()[4:], w0[4:])
        assert bool(res.converged[4:].all())  # outside the mask counts as done
        assert not bool(res.converged[0, 0])
        assert res.iterations == 30
        assert bool(res.converged[1:4].all())
