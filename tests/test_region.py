"""Region encoder: GLaMM key names/shapes (full size, on meta) and a working tiny forward."""

import pytest
import torch

from legion.model.region import RegionEncoder
from tests.model_core_tiny import (
    single_thread,  # noqa: F401 (fixture)
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _full_size_encoder():
    with torch.device("meta"):
        return RegionEncoder(channels=1024, out_dim=4096, patch_size=14)


def test_full_size_keys_shapes_and_parameter_count():
    shapes = {k: list(v.shape) for k, v in _full_size_encoder().state_dict().items()}
    for lvl in range(4):
        assert shapes[f"mlvl_fuse.input_conv.{lvl}.weight"] == [1024, 1026, 1, 1]
        assert shapes[f"mlvl_fuse.input_conv.{lvl}.bias"] == [1024]
        assert shapes[f"roi_align.pconvs.{lvl}.weight"] == [1024, 1024, 3, 3]
        assert shapes[f"roi_align.pconvs.{lvl}.bias"] == [1024]
    for i in range(5):
        assert shapes[f"mlvl_fuse.fuse_convs.{i}.conv.weight"] == [1024, 1024, 3, 3]
        assert f"mlvl_fuse.fuse_convs.{i}.conv.bias" not in shapes
        assert shapes[f"mlvl_fuse.fuse_convs.{i}.gn.weight"] == [1024]
        assert shapes[f"mlvl_fuse.fuse_convs.{i}.gn.bias"] == [1024]
    assert shapes["roi_align.flatten_linear.weight"] == [1024, 200704]
    assert shapes["roi_align.updims.weight"] == [4096, 1024]
    assert shapes["roi_align.pos_embedd.0.weight"] == [256, 4]
    assert shapes["roi_align.pos_embedd.2.weight"] == [256]
    assert shapes["roi_align.pos_embedd.3.weight"] == [1024, 256]
    assert shapes["roi_align.pos_embedd.5.weight"] == [1024]
    assert len(shapes) == 8 + 15 + 8 + 8 + 2 + 2  # input/fuse/pconv/pos_embedd/flatten/updims
    total = sum(v.numel() for v in _full_size_encoder().parameters())
    assert total == 299_142_912  # docs/model.md §0


def _tiny_inputs(batch=2, seed=0):
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    grid = cfg.vision_config["image_size"] // cfg.vision_config["patch_size"]
    n_states = cfg.vision_config["num_hidden_layers"] + 1
    hidden = tuple(torch.randn(batch, 1 + grid * grid, cfg.mm_hidden_size, generator=g) for _ in range(n_states))
    return cfg, hidden


def test_tiny_forward_shapes_and_gradients():
    cfg, hidden = _tiny_inputs()
    torch.manual_seed(0)
    enc = RegionEncoder.from_config(cfg)
    boxes = [torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.3, 0.2, 0.9, 0.8]])]
    out = enc(hidden, boxes)
    assert [tuple(o.shape) for o in out] == [(2, cfg.hidden_size), (1, cfg.hidden_size)]
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.sum() for o in out).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tiny_forward_depends_on_box_and_image():
    cfg, hidden = _tiny_inputs()
    torch.manual_seed(0)
    enc = RegionEncoder.from_config(cfg).eval()
    box = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    with torch.no_grad():
        a = enc(hidden, [box, box])
        b = enc(hidden, [torch.tensor([[0.5, 0.5, 0.9, 0.9]]), box])
    assert torch.allclose(a[1], b[1])  # image 1 unchanged
    assert not torch.allclose(a[0], b[0])  # another box on image 0 -> another query
    assert not torch.allclose(a[0], a[1])  # same box, different images
