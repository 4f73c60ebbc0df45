import pytest
import torch

from kvstore.errors import LayoutError, PayloadSizeError
from kvstore.layout import KVLayout


def test_sizes_and_zero_copy_views() -> None:
    lay = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    assert lay.block_nbytes == 32 * 2 * 16 * 8 * 128 * 2 == 2 << 20
    buf = bytearray(lay.block_nbytes)
    view = lay.view_block(buf)
    assert view.shape == lay.block_shape and view.dtype == torch.bfloat16
    view[3, 1, 5, 7, 9] = 1.5  # writes land in the caller's buffer: no copy was made
    assert lay.view_block(buf)[3, 1, 5, 7, 9].item() == 1.5
    mla = KVLayout(
        num_layers=2,
        num_kv_heads=1,
        head_dim=576,
        block_size=64,
        dtype="float8_e4m3fn",
        kv_factor=1,
    )
    assert mla.block_nbytes == 2 * 64 * 576


def test_bad_layouts_and_payloads_raise() -> None:
    with pytest.raises(LayoutError):
        KVLayout(4, 2, 64, 16, dtype="float64")
    with pytest.raises(LayoutError):
        KVLayout(0, 2, 64, 16)
    with pytest.raises(LayoutError):
        KVLayout(4, 2, 64, 16, kv_factor=3)
    lay = KVLayout(4, 2, 64, 16, dtype="float16")
    with pytest.raises(PayloadSizeError):
        lay.view_block(bytearray(lay.block_nbytes - 2))
    with pytest.raises(LayoutError):
        lay.block_slices(torch.zeros(lay.prompt_shape(32), dtype=torch.float32), 2)
    with pytest.raises(LayoutError):
        lay.block_slices(torch.zeros(lay.prompt_shape(16), dtype=torch.float16), 2)


def test_an_opaque_layout_holds_exactly_its_bytes_and_names_what_it_refuses() -> None:
    page = KVLayout.opaque(4096, what="pages")
    assert page.block_nbytes == 4096
    assert page.fingerprint() != KVLayout.opaque(4112).fingerprint()
    for bad in (0, -16, 100):
        with pytest.raises(LayoutError, match="pages must be a positive multiple of 16"):
            KVLayout.opaque(bad, what="pages")
