"""SpineNet architecture, training step, targets/decoding round trip and checkpoints."""

import collections
import logging

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from napari_spine_tracker.core.batches import make_batch
from napari_spine_tracker.core.decode import decode_peaks, nms_kernel
from napari_spine_tracker.core.model import (
    ResNeXtBlock,
    SpineNet,
    build_config,
    fuse_for_inference,
    use_cudnn_epilogues,
)
from napari_spine_tracker.core.targets import SessionPoints, make_targets
from napari_spine_tracker.core.train import compute_loss
from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return SpineNet(build_config("tiny"))


def test_forward_shapes(tiny_net):
    x = torch.randn(2, 3, 1, 8, 32, 48)
    out = tiny_net(x)
    expected = (2, 3, None, 8, 16, 24)
    for name, channels in SpineNet.HEADS.items():
        assert out[name].shape == (2, 3, channels, *expected[3:])
    assert tiny_net.output_stride == (1, 2, 2)
    assert tiny_net.total_stride == (4, 16, 16)


def test_forward_rejects_wrong_rank(tiny_net):
    with pytest.raises(ValueError, match="B, T, 1, Z, Y, X"):
        tiny_net(torch.randn(1, 8, 32, 32))


def test_sessions_share_state(tiny_net):
    """The ConvLSTM carries state: session 1's output depends on session 0's image."""
    tiny_net.eval()
    x = torch.randn(1, 2, 1, 8, 32, 32)
    y = x.clone()
    y[:, 0] = torch.randn_like(y[:, 0])
    with torch.no_grad():
        a, b = tiny_net(x)["heatmap"][:, 1], tiny_net(y)["heatmap"][:, 1]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("preset", ["tiny", "lean"])
def test_config_round_trip(preset):
    net = SpineNet(build_config(preset))
    clone = SpineNet(net.config)
    clone.load_state_dict(net.state_dict())
    assert build_config(preset)["preset"] == preset
    with pytest.raises(ValueError, match="unknown model size"):
        build_config("huge")


def _targets_for(points, out_shape=(8, 16, 16)):
    sessions = [SessionPoints(np.asarray(p, float), np.full((len(p), 3), np.nan), np.full(len(p), 0.4))
                for p in points]
    return make_targets(sessions, out_shape, (1, 2, 2), (0.5, 0.2, 0.2))


def test_targets_decode_back_to_the_points():
    """Targets fed through the decoder as perfect outputs give back the labelled points."""
    points = [[[3.0, 10.3, 20.8], [5.0, 2.0, 3.0]]]
    targets = _targets_for(points)
    heat = np.clip(targets["heatmap"], 1e-6, 1 - 1e-6)
    outputs = {
        "heatmap": torch.from_numpy(np.log(heat / (1 - heat))),
        "offset": torch.from_numpy(targets["offset"]),
        "displacement": torch.from_numpy(targets["displacement"]),
        "size": torch.from_numpy(targets["size"]),
    }
    peaks = decode_peaks(outputs, (1, 2, 2), nms_kernel((0.5, 0.2, 0.2), (0.6, 0.3, 0.3)), 0.5)[0]
    order = np.argsort(peaks.zyx[:, 0])
    np.testing.assert_allclose(peaks.zyx[order], np.asarray(points[0])[[0, 1]][np.argsort([3.0, 5.0])], atol=1e-5)
    np.testing.assert_allclose(peaks.radius_um, 0.4, atol=1e-6)


def test_training_step_reduces_loss(tiny_net):
    """A few optimisation steps on one fixed batch lower the loss (the graph is differentiable)."""
    rng = np.random.default_rng(0)
    points = [[[3.0, 10.0, 12.0], [4.0, 20.0, 6.0]], [[3.0, 11.0, 12.0]]]
    sessions = [SessionPoints(np.asarray(p, float), np.zeros((len(p), 3)), np.full(len(p), 0.3)) for p in points]
    image = rng.normal(0, 0.1, (2, 1, 8, 32, 32)).astype(np.float32)
    batch = {k: torch.from_numpy(v) for k, v in
             make_batch([(image, sessions, np.ones(2, bool))], (8, 16, 16), (1, 2, 2), (0.5, 0.2, 0.2)).items()}
    image = batch["image"]
    optimizer = torch.optim.Adam(tiny_net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, parts = compute_loss(tiny_net(image), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert set(parts) == {"focal", "offset", "displacement", "size"}
    assert losses[-1] < losses[0] * 0.8


def test_unlabelled_sessions_do_not_count(tiny_net):
    sessions = [SessionPoints(np.array([[3.0, 10.0, 12.0]]), np.zeros((1, 3)), np.full(1, 0.4)),
                SessionPoints(np.array([[3.0, 11.0, 12.0]]), np.zeros((1, 3)), np.full(1, 0.4))]
    image = np.zeros((2, 1, 8, 32, 32), np.float32)
    batch = {k: torch.from_numpy(v) for k, v in
             make_batch([(image, sessions, np.array([True, False]))], (8, 16, 16), (1, 2, 2), (0.5, 0.2, 0.2)).items()}
    out = tiny_net(torch.randn(1, 2, 1, 8, 32, 32))
    loss_masked, _ = compute_loss(out, batch)
    # changing the (masked) second session's predictions, every head, does not change the loss
    out2 = {k: v.clone() for k, v in out.items()}
    for value in out2.values():
        value[:, 1] += 5.0
    loss_masked2, _ = compute_loss(out2, batch)
    assert float(loss_masked) == pytest.approx(float(loss_masked2))
    out2["offset"][:, 0] += 5.0  # the first session's do
    assert float(compute_loss(out2, batch)[0]) > float(loss_masked) + 1.0


def _checkpoint(net):
    return {"config": net.config, "voxel_size_um": [0.5, 0.1, 0.1], "normalization": {"method": "percentile"},
            "decode": {"threshold": 0.3, "nms_radius_um": [0.6, 0.3, 0.3]}, "state_dict": net.state_dict(),
            "training": {"steps": 0}}


def test_checkpoint_round_trip(tmp_path, tiny_net):
    path = save_checkpoint(tmp_path / "m.pt", _checkpoint(tiny_net))
    loaded = load_checkpoint(path)
    assert loaded["format"] == "spinenet/1"
    clone = SpineNet(loaded["config"])
    clone.load_state_dict(loaded["state_dict"])
    for a, b in zip(clone.state_dict().values(), tiny_net.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_corrupt_checkpoint_rejected(tmp_path, tiny_net):
    path = save_checkpoint(tmp_path / "m.pt", _checkpoint(tiny_net))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(path)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(text)


def test_foreign_checkpoint_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    with pytest.raises(InputError, match="not a napari-spine-tracker model"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "spinenet/1", "payload": _Payload()}, path)
    with pytest.raises(InputError, match="weights_only"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_missing_checkpoint(tmp_path):
    with pytest.raises(InputError, match="no model checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_sparse_peak_decoding_equals_max_pooling():
    """Peaks found by comparing candidates with their neighbours are those of a dense max-pool."""
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 6, 20, 24) * 1.5 - 2
    outputs = {"heatmap": logits, "offset": torch.zeros(2, 3, 6, 20, 24),
               "displacement": torch.zeros(2, 3, 6, 20, 24), "size": torch.ones(2, 1, 6, 20, 24)}
    kernel = (3, 5, 5)
    pooled = torch.nn.functional.max_pool3d(logits, kernel, 1, (1, 2, 2))
    prob = torch.sigmoid(logits)
    for b, peaks in enumerate(decode_peaks(outputs, (1, 2, 2), kernel, 0.3)):
        dense = torch.nonzero((logits[b, 0] == pooled[b, 0]) & (prob[b, 0] >= 0.3)).numpy()
        expected = (dense + 0.5) * np.array([1, 2, 2]) - 0.5
        assert len(peaks.score) == len(dense) > 0
        np.testing.assert_allclose(np.sort(peaks.zyx, axis=0), np.sort(expected, axis=0))
        assert (peaks.score >= 0.3).all()


def test_decoder_skip_addition_equals_upsampling():
    """The broadcast skip addition (in place in inference) equals nearest upsampling plus add."""
    from napari_spine_tracker.core.model import _add_upsampled

    fine = torch.randn(2, 4, 8, 12, 16).contiguous(memory_format=torch.channels_last_3d)
    coarse = torch.randn(2, 4, 4, 6, 8).contiguous(memory_format=torch.channels_last_3d)
    expected = fine + torch.nn.functional.interpolate(coarse, size=(8, 12, 16), mode="nearest")
    assert torch.equal(_add_upsampled(fine, coarse), expected)
    with torch.inference_mode():
        inplace = fine.clone()
        assert torch.equal(_add_upsampled(inplace, coarse), expected)
    # sizes that are not multiples of the stride (any input size): the last blocks are cut short
    odd = torch.randn(1, 4, 7, 11, 16).contiguous(memory_format=torch.channels_last_3d)
    up = coarse[:1].repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    expected = odd + up[:, :, :7, :11, :16]
    assert torch.equal(_add_upsampled(odd, coarse[:1]), expected)
    with torch.inference_mode():
        inplace = odd.clone()
        assert torch.equal(_add_upsampled(inplace, coarse[:1]), expected)
    with pytest.raises(ValueError, match="cannot upsample"):
        _add_upsampled(torch.randn(1, 4, 9, 12, 16), coarse[:1])


@pytest.mark.parametrize("fine_shape, coarse_shape", [((2, 3, 4, 6, 6), (2, 3, 2, 3, 3)),  # 2 x 2 x 2 blocks
                                                       ((1, 2, 2, 8, 4), (1, 2, 1, 2, 2)),  # 2 x 4 x 2
                                                       ((1, 2, 3, 4, 4), (1, 2, 3, 2, 2))])  # 1 x 2 x 2
def test_decoder_skip_addition_has_the_gradient_of_upsampling_plus_add(fine_shape, coarse_shape):
    """In training the coarse map's gradient is summed over each block by hand (a custom autograd
    step): it is checked against finite differences, and equals that of upsampling plus add."""
    from napari_spine_tracker.core.model import _add_upsampled

    torch.manual_seed(0)
    fine, coarse = (torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
                    .requires_grad_() for shape in (fine_shape, coarse_shape))
    assert torch.autograd.gradcheck(_add_upsampled, (fine, coarse))
    weights = torch.randn(fine_shape, dtype=torch.float64)
    (_add_upsampled(fine, coarse) * weights).sum().backward()
    upsampled = F.interpolate(coarse, size=fine_shape[2:], mode="nearest")
    expected = torch.autograd.grad((upsampled * weights).sum(), coarse)[0]
    torch.testing.assert_close(coarse.grad, expected)
    torch.testing.assert_close(fine.grad, weights)


def test_any_input_size_matches_a_padded_input_inside():
    """The network takes sizes that are not multiples of its total stride; away from the far
    edges its outputs equal those of the same input padded up to a multiple."""
    torch.manual_seed(0)
    net = SpineNet(build_config("tiny")).eval()
    x = torch.rand(1, 2, 1, 9, 37, 45)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 11, 0, 3))  # up to (12, 48, 48)
    with torch.inference_mode():
        out = net(x)
        ref = net(padded)
    assert out["heatmap"].shape == (1, 2, 1, 9, 19, 23)
    for name in out:
        torch.testing.assert_close(out[name][..., :4, :8, :8], ref[name][..., :4, :8, :8])


def test_heads_at_the_peaks_equal_dense_heads():
    """Inference computes the offset, displacement and size heads at the peaks only: the decoded
    peaks are those of the dense heads."""
    torch.manual_seed(2)
    net = SpineNet(build_config("tiny")).eval()
    with torch.no_grad():
        net.heads["heatmap"].bias.fill_(0.0)
    x = torch.rand(1, 3, 1, 8, 32, 48)
    with torch.inference_mode():
        dense, _ = net.forward_sessions(x)
        sparse, _ = net.forward_sessions(x, point_heads=True)
    assert set(sparse) == {"heatmap", "trunk"}
    kernel = (3, 3, 3)
    for t in range(3):
        a = decode_peaks({name: value[:, t] for name, value in dense.items()}, (1, 2, 2), kernel, 0.4)[0]
        b = decode_peaks({name: value[:, t] for name, value in sparse.items()}, (1, 2, 2), kernel, 0.4,
                         heads_at=net.heads_at)[0]
        assert len(a.score) > 0
        for field in ("zyx", "score", "displacement_um", "radius_um"):
            np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="heads_at"):
        decode_peaks({name: value[:, 0] for name, value in sparse.items()}, (1, 2, 2), kernel, 0.4)


@pytest.mark.parametrize(("preset", "added_blocks"), [("deep", ["down.1.1", "down.2.1"]), ("fine", ["up.0.0"])])
def test_a_lean_model_grows_without_changing_its_output(preset, added_blocks):
    """Deeper coarse levels (deep) or a block at the finest level (fine): the grown model computes
    what the lean one did, and the added blocks learn."""
    from napari_spine_tracker.core.model import grow_config, load_grown

    torch.manual_seed(0)
    small = _randomised(SpineNet(build_config("lean")))  # so that the check means something
    old_config = {key: value for key, value in small.config.items() if key != "fine_blocks"}  # an older checkpoint's
    grown = SpineNet(grow_config(old_config, preset))
    added = load_grown(grown, small.state_dict())
    assert added == added_blocks
    assert grown.config["blocks"] == build_config(preset)["blocks"] and grown.config["preset"] == preset
    assert grown.config["fine_blocks"] == build_config(preset)["fine_blocks"]
    x = torch.randn(1, 2, 1, 16, 64, 64)
    small.eval(), grown.eval()
    with torch.no_grad():
        before, after = small(x), grown(x)
        fused = SpineNet(grown.config)
        fused.load_state_dict(grown.state_dict())
        folded = fuse_for_inference(fused.eval())(x)  # BatchNorm folded, the added blocks' too
    for name in SpineNet.HEADS:
        torch.testing.assert_close(after[name], before[name])
        torch.testing.assert_close(folded[name], after[name], rtol=1e-4, atol=1e-4)
    grown.train()  # and the added blocks learn: their last BatchNorm scale gets a gradient
    loss = grown(x)["heatmap"].square().mean()
    loss.backward()
    modules = dict(grown.named_modules())
    for name in added_blocks:
        assert modules[name].expand[1].weight.grad.abs().sum() > 0


def test_a_fine_model_cannot_lose_its_fine_block():
    from napari_spine_tracker.core.model import grow_config

    with pytest.raises(ValueError, match="fine blocks 1 -> 0"):
        grow_config(build_config("fine"), "deep")


@pytest.mark.parametrize("preset", ["base", "tiny"])
def test_growing_into_other_widths_is_refused(preset):
    from napari_spine_tracker.core.model import grow_config

    with pytest.raises(ValueError, match="only blocks can be added"):
        grow_config(build_config("deep"), preset)
    if preset == "base":  # lean -> base changes the widths as well
        with pytest.raises(ValueError, match="widths"):
            grow_config(build_config("lean"), preset)


def test_sessions_cut_from_a_larger_field(tiny_net):
    """A session run on a cut of the field reads and updates the ConvLSTM state under its cut
    only; with the whole field as the cut it computes exactly what the plain call does."""
    tiny_net.eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 1, 8, 32, 48)
    grid = (2, 2, 3)  # the coarsest level of 8 x 32 x 48 at a total stride of 4 x 16 x 16
    with torch.no_grad():
        plain, plain_state = tiny_net.forward_sessions(x)
        pairs = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # what the plain call pairs each session with
        whole, whole_state = tiny_net.forward_sessions(x, pairs=pairs, cut_at=[(0, 0, 0)] * 3, field_grid=grid)
        for name in plain:
            torch.testing.assert_close(whole[name], plain[name])
        for a, b in zip(whole_state, plain_state, strict=True):
            torch.testing.assert_close(a, b)

        # a cut of 8 x 32 x 32 at x = 16 voxels (one coarsest voxel in): the state at x = 0 is
        # left as it was, the state under the cut is what a plain call on the cut gives
        cut = x[..., 16:]
        before = tuple(torch.randn(1, tiny_net.lstm.gates.out_channels // 4, *grid) for _ in range(2))
        out, after = tiny_net.forward_sessions(cut[:, :1], pairs=cut[:, :1], state=tuple(s.clone() for s in before),
                                               cut_at=[(0, 0, 1)], field_grid=grid)
        alone, alone_state = tiny_net.forward_sessions(cut[:, :1], state=tuple(s[..., 1:] for s in before))
        torch.testing.assert_close(out["heatmap"], alone["heatmap"])
        for a, b, c in zip(after, alone_state, before, strict=True):
            torch.testing.assert_close(a[..., 1:], b)
            torch.testing.assert_close(a[..., :1], c[..., :1])
        with pytest.raises(ValueError, match="leaves the state's field"):
            tiny_net.forward_sessions(cut[:, :1], pairs=cut[:, :1], cut_at=[(0, 0, 2)], field_grid=grid)
        with pytest.raises(ValueError, match="field_grid"):
            tiny_net.forward_sessions(cut[:, :1], pairs=cut[:, :1], cut_at=[(0, 0, 1)])


def _cudnn_on_cpu(monkeypatch, fail=None):
    """Stand-ins for cuDNN's fused convolutions on the CPU, and the epilogues let run there: the
    wiring of the fused path (biases joined, residuals, types) is checked without a GPU."""
    from napari_spine_tracker.core import model as model_module

    calls = collections.Counter()

    def conv_relu(x, weight, bias, stride, padding, dilation, groups):
        calls["relu"] += 1
        if fail is not None:
            raise fail
        return F.relu(F.conv3d(x, weight, bias, stride, padding, dilation, groups))

    def conv_add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
        calls["add_relu"] += 1
        if fail is not None:
            raise fail
        assert z.shape[1] == weight.shape[0] and z.dtype == x.dtype == weight.dtype == bias.dtype
        return F.relu(F.conv3d(x, weight, bias, stride, padding, dilation, groups) + alpha * z)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu, raising=False)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu, raising=False)
    monkeypatch.setattr(model_module, "_epilogue_ready", lambda x: not torch.is_grad_enabled())
    return calls


@pytest.mark.parametrize("preset", ["lean", "fine", "tiny"])
def test_cudnn_epilogues_give_the_plain_outputs(monkeypatch, preset):
    from napari_spine_tracker.core.model import ConvBNReLU

    torch.manual_seed(0)
    net = fuse_for_inference(_randomised(SpineNet(build_config(preset))).eval())
    blocks = [m for m in net.modules() if isinstance(m, ResNeXtBlock)]
    assert all(block.epilogue for block in blocks)
    assert all(m.epilogue == (len(m) == 3) for m in net.modules() if isinstance(m, ConvBNReLU))
    x = torch.randn(1, 2, 1, 12, 40, 36)  # not multiples of the strides
    with torch.no_grad():
        plain = use_cudnn_epilogues(net, False)(x)
        calls = _cudnn_on_cpu(monkeypatch)
        fused = use_cudnn_epilogues(net, True)(x)
    assert calls["add_relu"] == len(blocks)  # every block once: the sessions run as one batch
    for name in SpineNet.HEADS:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-4)
    with torch.enable_grad():  # training never takes the fused path
        calls.clear()
        net(x)
    assert not calls


def test_a_cudnn_epilogue_that_fails_falls_back_for_good(monkeypatch, caplog):
    torch.manual_seed(0)
    net = fuse_for_inference(_randomised(SpineNet(build_config("tiny"))).eval())
    x = torch.randn(1, 2, 1, 8, 32, 32)
    with torch.no_grad():
        plain = use_cudnn_epilogues(net, False)(x)["heatmap"]
        use_cudnn_epilogues(net, True)
        _cudnn_on_cpu(monkeypatch, fail=RuntimeError("GET was unable to find an engine to execute this computation"))
        with caplog.at_level(logging.WARNING):
            fallen = net(x)["heatmap"]
    assert "could not fuse" in caplog.text
    assert not any(getattr(m, "epilogue", False) for m in net.modules())
    torch.testing.assert_close(fallen, plain)


def test_out_of_memory_in_a_cudnn_epilogue_is_not_swallowed(monkeypatch):
    net = fuse_for_inference(SpineNet(build_config("tiny")).eval())
    _cudnn_on_cpu(monkeypatch, fail=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with torch.no_grad(), pytest.raises(torch.cuda.OutOfMemoryError):
        net(torch.randn(1, 1, 1, 8, 32, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cudnn_epilogues_match_the_plain_path_on_cuda(dtype):
    from napari_spine_tracker.core.devices import inference_autocast

    torch.manual_seed(0)
    net = fuse_for_inference(_randomised(SpineNet(build_config("lean"))).eval()).to("cuda")
    x = torch.randn(1, 3, 1, 16, 72, 64, device="cuda")
    with torch.inference_mode(), inference_autocast(torch.device("cuda"), dtype):
        plain = use_cudnn_epilogues(net, False)(x)
        fused = use_cudnn_epilogues(net, True)(x)
    assert all(m.epilogue for m in net.modules() if isinstance(m, ResNeXtBlock))  # no fallback
    tolerance = 2e-2 if dtype == "float16" else 1e-3
    for name in SpineNet.HEADS:
        torch.testing.assert_close(fused[name].float(), plain[name].float(), rtol=tolerance, atol=tolerance)


def _randomised(net: SpineNet) -> SpineNet:
    """Trained-looking BatchNorm statistics and affine terms, so that folded biases are not zero."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return net
