"""Network speed on this machine: eager vs torch.compile, and architecture variants.

Inference of the network alone (no reading, registration or linking: see compare.py for end to
end) on a batch of 4 sessions of 32 x 256 x 256 voxels, after warm-up, best of three. For
``torch.compile`` the one-off compile time is printed beside the steady speed, so that the
break-even series size can be read off.

    python benchmarks/speed.py                  # CPU, the shipped model's architecture, deep and fine
    python benchmarks/speed.py --device cuda    # on a GPU: fp16 autocast (as detect uses), and the
                                                # shipped one with its biases and ReLUs outside cuDNN
    python benchmarks/speed.py --variants       # also group widths 4, 8 and dense convolutions
"""

from __future__ import annotations

import argparse
import sys
import time


def measure(net, x, device, repeats: int = 3) -> float:
    """Best voxels/s of ``net(x)`` over ``repeats`` runs."""
    import torch

    from napari_spine_tracker.core.devices import inference_autocast

    best = float("inf")
    with torch.inference_mode(), inference_autocast(device):
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return x.numel() / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", nargs=4, type=int, default=[4, 32, 256, 256], metavar=("T", "Z", "Y", "X"))
    parser.add_argument("--variants", action="store_true", help="also other group widths")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from napari_spine_tracker.core.devices import get_device, inference_autocast
    from napari_spine_tracker.core.model import SpineNet, build_config, count_parameters, fuse_for_inference
    from napari_spine_tracker.core.models import DEFAULT_MODEL, resolve_model
    from napari_spine_tracker.io.checkpoint import load_checkpoint

    device = get_device(args.device)
    x = torch.randn(1, args.shape[0], 1, *args.shape[1:], device=device)
    shipped = load_checkpoint(resolve_model(DEFAULT_MODEL))["config"]
    configs = {f"{shipped.get('preset', 'custom')} (shipped)": shipped}
    configs.update({other: build_config(other) for other in ("lean", "deep", "fine") if other != shipped.get("preset")})
    plain = f"{shipped.get('preset', 'custom')}, cuDNN epilogues off"  # biases, residuals, ReLUs apart
    if device.type == "cuda":
        configs[plain] = shipped
    if args.variants:
        configs["lean, 8-channel groups"] = build_config("lean", group_width=8)
        configs["lean, 4-channel groups"] = build_config("lean", group_width=4)
        configs["lean, dense"] = build_config("lean", group_width=0)
    print(f"device {device}, input {tuple(x.shape)} (B, T, 1, Z, Y, X), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    for name, config in configs.items():
        net = fuse_for_inference(SpineNet(config).eval(), cudnn_epilogues=name != plain).to(device)
        with torch.inference_mode(), inference_autocast(device):
            net(x)  # warm-up
        eager = measure(net, x, device)
        line = f"{name:36s} {count_parameters(net):7d} params  eager {eager / 1e6:8.2f} Mvoxel/s"
        if not args.no_compile:
            compiled = torch.compile(net)
            start = time.perf_counter()
            with torch.inference_mode(), inference_autocast(device):
                compiled(x)
            compile_s = time.perf_counter() - start
            fast = measure(compiled, x, device)
            line += f"  compiled {fast / 1e6:8.2f} Mvoxel/s (compile {compile_s:.0f} s)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
