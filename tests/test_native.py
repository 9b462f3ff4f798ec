"""The native CPU kernel (sim_backend/native) against the torch kernels: same normals, same
pulses, same outer updates (to float rounding), packed fire masks equal to the counts."""

from __future__ import annotations

import pytest
import torch

import hil
import sim_backend.emulator as em
from sim_backend import native
from sim_backend.kernels import output_normals, pulse_normal

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel unavailable: {native.unavailable_reason()}")

MODELS = [("linear", ""), ("power", "&gamma=0.5"), ("power", "&gamma=2"),
          ("power", "&gamma=1.7"), ("exp", "&gamma=1")]


def url(model: str, extra: str, c2c: float, engine: str = "native") -> str:
    return (f"sim://?model={model}{extra}&tau=0.6&dw_min=2e-3&d2d=0.2&asym=0.1&stuck=0.05"
            f"&c2c={c2c}&engine={engine}&seed=4")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_native_normals_match_the_torch_counter_normals():
    g = gen(1)
    h = torch.randint(-(2**31), 2**31 - 1, (2000,), generator=g).to(torch.int32)
    t = torch.randint(0, 5000, (2000,), generator=g, dtype=torch.int32)
    ours = torch.tensor([native.pulse_normal(int(a), int(b)) for a, b in zip(h, t, strict=True)])
    ref = pulse_normal(h, t)
    assert float((ours - ref).abs().max()) < 5e-6
    assert abs(float(ours.mean())) < 0.1 and float(ours.std()) == pytest.approx(1.0, abs=0.05)
    # the two pulses of a pair (cosine and sine of one Box-Muller draw) are independent
    h = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g).to(torch.int32)
    p = torch.randint(0, 5000, (20000,), generator=g, dtype=torch.int32)
    even, odd = pulse_normal(h, 2 * p), pulse_normal(h, 2 * p + 1)
    assert abs(float(torch.corrcoef(torch.stack([even, odd]))[0, 1])) < 0.03
    assert float(odd.std()) == pytest.approx(1.0, abs=0.03)
    assert abs(float(odd.mean())) < 0.03 and abs(float((odd**3).mean())) < 0.1


@pytest.mark.parametrize("model,extra", MODELS)
@pytest.mark.parametrize("c2c", [0.0, 0.3])
def test_native_pulses_match_eager(model, extra, c2c):
    """tile.pulse: pulse k of a device draws counter k in both, so the results agree to
    rounding (bit for bit for the linear response without noise)."""
    n = torch.randint(-45, 46, (40, 56), generator=gen(2), dtype=torch.int32)  # runs > 32 too
    out = {}
    for engine in ("native", "eager"):
        with hil.open_backend(url(model, extra, c2c, engine)) as be:
            tile = be.allocate("t", 40, 56)
            w0 = tile.read()
            tile.pulse(n)
            out[engine] = tile.read()
    moved = float((out["eager"] - w0).abs().max())
    assert moved > 0.02
    diff = float((out["native"] - out["eager"]).abs().max())
    if model == "linear" and c2c == 0:
        assert diff == 0.0
    assert diff < 1e-6


@pytest.mark.parametrize("model,extra", MODELS)
@pytest.mark.parametrize("c2c", [0.0, 0.3])
@pytest.mark.parametrize("batch", [7, 40])
def test_native_outer_update_matches_eager(model, extra, c2c, batch):
    """outer_update: packed fire masks on the native path, counts and the device-major torch
    kernel on the eager one; same draws and noise counters, so the same weights (also past
    31 samples, where the groups' sample masks stop being one bit per sample)."""
    g = gen(3)
    x, d = torch.rand(batch, 56, generator=g) * 2 - 1, torch.rand(batch, 40, generator=g) * 2 - 1
    out = {}
    for engine in ("native", "eager"):
        with hil.open_backend(url(model, extra, c2c, engine)) as be:
            tile = be.allocate("t", 40, 56)
            w0 = tile.read()
            tile.outer_update(x, d, 0.05)
            tile.outer_update(-x, d, 0.02)
            out[engine] = tile.read()
    assert float((out["eager"] - w0).abs().max()) > 0.01
    assert float((out["native"] - out["eager"]).abs().max()) < 1e-6


@pytest.mark.parametrize("first,width", [(0, 56), (5, 13), (55, 1), (16, 8), (3, 5)])
def test_native_column_pulses_equal_the_padded_map(first, width):
    """pulse_columns on the native kernel walks only the column range, with the devices'
    tile indices for their noise streams: bit for bit pulse() of the zero-padded map."""
    n = torch.randint(-40, 41, (40, width), generator=gen(8), dtype=torch.int32)
    full = torch.zeros(40, 56, dtype=torch.int32)
    full[:, first:first + width] = n
    out = {}
    for how in ("columns", "padded"):
        with hil.open_backend(url("power", "&gamma=0.5", 0.3)) as be:
            tile = be.allocate("t", 40, 56)
            w0 = tile.read()
            if how == "columns":
                tile.pulse_columns(n, slice(first, first + width))
            else:
                tile.pulse(full)
            out[how] = tile.read()
            assert torch.equal(tile.read_columns(slice(first, first + width)),
                               out[how][:, first:first + width])
    assert torch.equal(out["columns"], out["padded"])
    moved = (out["columns"] - w0).abs() > 0
    assert bool(moved[:, first:first + width].any()) and not bool(moved[:, :first].any())


@pytest.mark.parametrize("batch, n_out", [(9, 37), (4, 16), (1, 3), (70, 300)])
def test_native_mvm_draws_the_torch_output_normals_from_the_call_key(batch, n_out):
    """An MVM's output noise comes from one call key: the native kernel draws output e's
    normal in registers (pulse_normal of the salted key at counter e), the torch path
    builds the same with kernels.output_normals; standard normal, a new key new noise."""
    w, x = torch.zeros(n_out, 5), torch.ones(batch, 5)  # y = sigma * noise, fine levels

    def drawn(key: int) -> torch.Tensor:
        return native.mvm(x, [(w, 1.0)], False, key, 1.0, 1.0, 1e-7, 1e6, 1e-7)

    for key in (0, 12345, -(2**31), 2**31 - 1):
        ref = output_normals(torch.tensor(key, dtype=torch.int32), (batch, n_out), "cpu")
        assert float((drawn(key) - ref).abs().max()) < 5e-6
    big = output_normals(torch.tensor(7, dtype=torch.int32), (400, 500), "cpu")
    assert abs(float(big.mean())) < 0.01 and float(big.std()) == pytest.approx(1.0, abs=0.01)
    assert not torch.equal(drawn(1), drawn(2)) and torch.equal(drawn(3), drawn(3))


@pytest.mark.parametrize("transpose", [False, True])
def test_native_mvm_periphery_equals_the_torch_ops(transpose):
    """mvm: the whole MVM in one native call (DAC quantization, products, output noise, ADC
    quantization) gives the torch ops' outputs: the same generator draws and levels; the
    products summed in another order can move an output across an ADC level boundary,
    which happens at most to a few outputs and by one level."""
    x = torch.randn(9, 40 if transpose else 56, generator=gen(6)) * 3
    x[2] = 0.0  # an all-zero input row: scale clamps at 1e-12
    x[3, 5] = 50.0  # one large entry: the others quantize to few levels
    out = {}
    for engine in ("native", "eager"):
        with hil.open_backend(url("linear", "", 0.0, engine) + "&out_noise=0.2") as be:
            tile = be.allocate("t", 40, 56)
            tile.w.uniform_(-0.6, 0.6, generator=gen(7))
            out[engine] = torch.stack([tile.mvm(x, transpose=transpose) for _ in range(3)])
    level = 2 * 12.0 / (2**9 - 2) * x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    diff = (out["native"] - out["eager"]).abs()
    assert bool((diff <= level * 1.0001).all())
    assert float((diff > 0).float().mean()) < 0.01
    assert float(out["native"].std()) > 0.1 and not torch.equal(out["native"][0],
                                                                out["native"][1])


@pytest.mark.parametrize("train_length", [40, 93])
def test_native_outer_update_with_multiword_trains_matches_eager(train_length):
    """Trains longer than one 31-slot mask word, lr < 0 (which flips the row signs) and 33
    columns (groups of 8 devices that cross rows, no per-group coincidence map): the
    popcounts over several words give pulse_train_counts' counts."""
    g = gen(4)
    x, d = torch.rand(5, 33, generator=g) * 2 - 1, torch.rand(5, 17, generator=g) * 2 - 1
    x[0, :3] = 0.0
    out = {}
    for engine in ("native", "eager"):
        with hil.open_backend(url("linear", "", 0.3, engine)
                              + f"&train_length={train_length}") as be:
            tile = be.allocate("t", 17, 33)
            w0 = tile.read()
            tile.outer_update(x, d, -0.3)
            out[engine] = tile.read()
    assert float((out["eager"] - w0).abs().max()) > 0.05
    assert float((out["native"] - out["eager"]).abs().max()) < 1e-6


def test_native_pulse_trains_equal_device_major_torch_kernel_with_noise():
    """apply_pulse_trains on counts: the native kernel and the torch device-major kernel
    number a device's noise counters by its pulses, so even noisy results agree."""
    counts = torch.randint(-9, 10, (6, 24, 24), generator=gen(5)).to(torch.int8)
    out = {}
    for engine, method in (("native", "auto"), ("eager", "device")):
        with hil.open_backend(url("power", "&gamma=0.5", 0.4, engine)) as be:
            t = be.allocate("t", 24, 24)
            em.apply_pulse_trains(t.w, counts, t.devices, t.gen, engine=engine, method=method)
            out[engine] = t.read()
    assert float((out["native"] - out["eager"]).abs().max()) < 1e-6


def test_a_copied_device_array_drives_the_kernel_like_the_original():
    """The kernel takes the coefficients' addresses at each call, so a pickled (or
    deep-copied) FusedParams works and gives the same pulses (no stale pointers)."""
    import pickle

    with hil.open_backend(url("power", "&gamma=0.5", 0.3)) as be:
        tile = be.allocate("t", 16, 24)
        fp = tile.devices.fused()
        n = torch.randint(-5, 6, (1, 16 * 24), generator=gen(10), dtype=torch.int32)
        out = []
        for params in (fp, pickle.loads(pickle.dumps(fp))):
            w = tile.w.clone().view(-1)
            native.pulse_trains(w, params, 7, True, counts=n)
            out.append(w)
        assert torch.equal(out[0], out[1]) and not torch.equal(out[0], tile.w.view(-1))


def test_engine_native_without_the_kernel_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", "no C++ compiler (test)")
    with hil.open_backend(url("linear", "", 0.0)) as be:
        tile = be.allocate("t", 4, 4)
        with pytest.raises(hil.errors.BackendError, match="engine=native.*no C\\+\\+ compiler"):
            tile.pulse(torch.ones(4, 4, dtype=torch.int32))
    with hil.open_backend(url("linear", "", 0.0, "auto")) as be:  # auto: torch kernels
        tile = be.allocate("t", 4, 4)
        w0 = tile.read()
        tile.pulse(torch.ones(4, 4, dtype=torch.int32))
        assert bool((tile.read() > w0).any())


def test_the_library_is_built_into_the_cache_once(tmp_path, monkeypatch):
    """A fresh cache directory gets one compiled library; loading again reuses it."""
    monkeypatch.setenv("HIL_CACHE_DIR", str(tmp_path))
    lib = native._load()
    built = list((tmp_path / "native").glob("pulses-*.so"))
    assert len(built) == 1 and lib.hil_pulse_trains is not None
    mtime = built[0].stat().st_mtime_ns
    native._load()
    assert built[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("d2d", [0.0, 0.2])
def test_native_threads_and_uniform_populations_change_no_bit(monkeypatch, d2d):
    """The kernel splits fire masks, coincidences and groups over threads, and reads the
    coefficients of a population without d2d spread once: the same weights bit for bit
    as one thread, and (to rounding) as the eager torch kernels."""
    g = gen(9)
    x, d = torch.rand(12, 64, generator=g) * 2 - 1, torch.rand(12, 48, generator=g) * 2 - 1
    n = torch.randint(-3, 4, (48, 64), generator=g, dtype=torch.int32)
    out = {}
    for how, threaded, engine in (("one", False, "native"), ("threads", True, "native"),
                                  ("eager", False, "eager")):
        monkeypatch.setattr(native, "MIN_THREADED", 1 if threaded else 1 << 40)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        url = (f"sim://?model=power&gamma=0.5&tau=0.6&dw_min=2e-3&d2d={d2d}&c2c=0.2"
               f"&engine={engine}&seed=5")
        with hil.open_backend(url) as be:
            tile = be.allocate("t", 48, 64)
            assert tile.devices.fused().uniform == (d2d == 0)
            tile.outer_update(x, d, 0.05)
            tile.pulse(n)
            out[how] = tile.read()
    assert torch.equal(out["one"], out["threads"])
    assert float((out["one"] - out["eager"]).abs().max()) < 1e-6


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("coeffs", [(1.0, 0.3), (1.0, 0.3, -0.3), (0.5,), (2.0, -1.0)])
def test_native_mvm_of_weighted_sums_equals_the_torch_ops(transpose, coeffs):
    """mvm_sum on the native kernel (W_0 + c W_1 summed on the fly, other sums row by row,
    both directions, batches not a multiple of the sample block) against the torch ops on
    the summed weights: within one ADC level, at a few outputs."""
    x = torch.randn(7, 37 if transpose else 53, generator=gen(10))
    out = {}
    for engine in ("native", "eager"):
        with hil.open_backend(url("linear", "", 0.0, engine) + "&out_noise=0.1") as be:
            tiles = [be.allocate(f"t{k}", 37, 53) for k in range(len(coeffs))]
            for k, t in enumerate(tiles):
                t.w.uniform_(-0.6, 0.6, generator=gen(20 + k))
            out[engine] = be.mvm_sum(list(zip(tiles, coeffs, strict=True)), x, transpose)
    level = 2 * 12.0 / (2**9 - 2) * x.abs().amax(dim=1, keepdim=True)
    diff = (out["native"] - out["eager"]).abs()
    assert bool((diff <= level * 1.0001).all()) and float((diff > 0).float().mean()) < 0.02
    assert float(out["native"].std()) > 0.1


def test_native_mvm_threads_change_no_bit(monkeypatch):
    """The MVM splits rows (columns when transposed) over threads: each output is summed
    by one thread in the same order, so the outputs equal the one-thread ones bit for bit."""
    x, d = torch.randn(6, 53, generator=gen(11)), torch.randn(6, 37, generator=gen(12))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    out = {}
    for threaded in (False, True):
        monkeypatch.setattr(native, "MIN_THREADED_MVM", 1 if threaded else 1 << 40)
        with hil.open_backend(url("linear", "", 0.0) + "&out_noise=0.1") as be:
            w, p = be.allocate("w", 37, 53), be.allocate("p", 37, 53)
            p.w.uniform_(-0.3, 0.3, generator=gen(13))
            out[threaded] = [be.mvm_sum([(w, 1.0), (p, 0.2)], x), w.mvm(d, transpose=True)]
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True], strict=True))
