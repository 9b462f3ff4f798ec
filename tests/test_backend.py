"""The backend contract: URL parsing, the scheme registry, open_backend, tiles, capabilities,
typed errors, and one clear error per bad sim:// parameter."""

from __future__ import annotations

import pytest
import torch

import hil
from hil.backend import Backend, Capabilities, Tile
from hil.errors import BackendError, BackendURLError, HilError, UnsupportedOperation
from hil.url import BackendURL


def test_url_parsing_and_typed_getters():
    u = BackendURL.parse("SIM://loc/x?model=power&tau=0.6&seed=3")
    assert (u.scheme, u.location) == ("sim", "loc/x")
    assert u.get_str("model", choices=("power", "exp")) == "power"
    assert u.get_float("tau") == 0.6 and u.get_int("seed") == 3
    assert u.get_float("gamma", 1.5) == 1.5 and u.has("tau") and not u.has("gamma")
    u.finish()


@pytest.mark.parametrize("url,match", [
    ("sim:/?x=1", "no scheme"),
    ("1x://", "bad scheme"),
    ("sim://?seed=1&seed=2", "seed.*twice"),
])
def test_malformed_urls(url, match):
    with pytest.raises(BackendURLError, match=match):
        BackendURL.parse(url)


@pytest.mark.parametrize("query,name", [
    ("model=cubic", "model"),
    ("tau=-1", "tau"),
    ("tau=abc", "tau"),
    ("tau=0.5&tau_max=0.7", "tau"),
    ("tau_min=0.5&tau_max=0.2", "tau_max"),
    ("gamma=0", "gamma"),
    ("dw_min=0", "dw_min"),
    ("asym=1.5", "asym"),
    ("d2d=-0.1", "d2d"),
    ("c2c=x", "c2c"),
    ("read_noise=-1", "read_noise"),
    ("stuck=2", "stuck"),
    ("init=zero", "init"),
    ("device=tpu", "device"),
    ("seed=-1", "seed"),
    ("seed=1.5", "seed"),
    ("io=analog", "io"),
    ("train_length=0", "train_length"),
    ("engine=jit", "engine"),
    ("inp_bits=0", "inp_bits"),
    ("out_bound=0", "out_bound"),
    ("moddel=power", "moddel"),
])
def test_bad_sim_parameter_gets_one_clear_error_naming_it(query, name):
    with pytest.raises(BackendURLError) as info:
        hil.open_backend(f"sim://?{query}")
    msg = str(info.value)
    assert name in msg and "\n" not in msg


def test_sim_rejects_a_location():
    with pytest.raises(BackendURLError, match="location"):
        hil.open_backend("sim://model=power")


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(BackendURLError, match="unknown backend scheme 'nope'.*sim"):
        hil.open_backend("nope://x")


def test_open_backend_is_a_context_manager_and_close_is_final():
    with hil.open_backend("sim://?model=exp&gamma=2&seed=1") as be:
        assert be.config.model == "exp" and be.config.gamma == 2.0
        tile = be.allocate("fc1.W", 3, 4)
        assert tile.shape == (3, 4) and tile.numel == 12 and be.tile("fc1.W") is tile
        assert set(be.tiles()) == {"fc1.W"}
    assert be.closed
    for call in (lambda: be.allocate("x", 1, 1), lambda: be.tile("fc1.W"), tile.read):
        with pytest.raises(BackendError, match="closed"):
            call()


def test_sim_capabilities():
    with hil.open_backend("sim://?device=cpu") as be:
        caps = be.capabilities
        assert caps.mvm and caps.outer_update and caps.snapshot and caps.device == "cpu"


def test_allocate_and_tile_errors_carry_tile_and_op():
    with hil.open_backend("sim://") as be:
        be.allocate("a", 2, 2)
        with pytest.raises(BackendError) as info:
            be.allocate("a", 2, 2)
        assert info.value.tile == "a" and info.value.op == "allocate"
        with pytest.raises(BackendError, match="bad tile shape"):
            be.allocate("b", 0, 3)
        with pytest.raises(BackendError, match="known: a"):
            be.tile("zzz")


class _ReadOnlyTile(Tile):
    def read(self) -> torch.Tensor:
        return torch.zeros(self.shape)

    def _pulse(self, n: torch.Tensor) -> None:
        self.last = n


class _MinimalBackend(Backend):
    capabilities = Capabilities(max_pulses_per_command=5)

    def _allocate(self, name: str, rows: int, cols: int) -> Tile:
        return _ReadOnlyTile(self, name, rows, cols, dw_min=1e-3)


def test_registry_with_a_custom_backend_and_optional_operations():
    hil.register_backend("minimal", lambda url: _MinimalBackend(url.url))
    with hil.open_backend("minimal://") as be:
        tile = be.allocate("t", 2, 3)
        with pytest.raises(UnsupportedOperation) as info:
            tile.mvm(torch.zeros(1, 3))
        assert info.value.op == "mvm" and info.value.tile == "t"
        with pytest.raises(UnsupportedOperation):
            tile.outer_update(torch.zeros(1, 3), torch.zeros(1, 2), 0.1)
        with pytest.raises(UnsupportedOperation):
            be.state_dict()
        with pytest.raises(BackendError, match="exceeds 5 per command"):
            tile.pulse(torch.full((2, 3), 6, dtype=torch.int64))
        tile.pulse(torch.full((2, 3), -5, dtype=torch.int64))
        assert tile.last.dtype == torch.int32
    with pytest.raises(BackendURLError, match="unknown parameter"):
        hil.open_backend("minimal://?x=1")  # nobody consumed x


def test_column_reads_and_pulses_default_to_the_whole_tile():
    """A backend without column addressing: read_columns slices read(), pulse_columns pads
    the counts with zeros for pulse(); bad column selections are one clear error."""
    with _MinimalBackend("minimal://") as be:
        tile = be.allocate("t", 2, 4)
        assert tile.read_columns(slice(1, 3)).shape == (2, 2)
        tile.pulse_columns(torch.tensor([[1, -2], [3, 0]]), slice(1, 3))
        assert torch.equal(tile.last, torch.tensor([[0, 1, -2, 0], [0, 3, 0, 0]],
                                                   dtype=torch.int32))
        with pytest.raises(BackendError, match="columns take \\(2, 2\\)"):
            tile.pulse_columns(torch.zeros(2, 3, dtype=torch.int32), slice(1, 3))
        with pytest.raises(BackendError, match="exceeds 5 per command"):
            tile.pulse_columns(torch.full((2, 1), 6), slice(0, 1))
        for bad in (slice(0, 4, 2), slice(3, 3), 1):
            with pytest.raises(BackendError, match="contiguous slice|empty column range"):
                tile.read_columns(bad)


def test_lazy_registration_by_module_path():
    hil.register_backend("sim2", "sim_backend:open_sim")
    with hil.open_backend("sim2://?seed=4") as be:
        assert be.config.seed == 4


def test_typed_error_hierarchy():
    assert issubclass(UnsupportedOperation, BackendError)
    assert issubclass(hil.SafetyLimitError, BackendError)
    assert issubclass(hil.InstrumentTimeout, BackendError)
    assert issubclass(BackendURLError, ValueError) and issubclass(BackendURLError, HilError)
    err = hil.ConfigError("run.yaml", "train.lr", "must be positive")
    assert str(err) == "run.yaml: train.lr: must be positive" and err.field == "train.lr"
    assert str(BackendError("boom", tile="t", op="read")) == "boom [tile 't', read]"
