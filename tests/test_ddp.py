"""Two-process DistributedDataParallel training on CPUs (gloo), launched with torchrun.

The train command has no flags for tiny pools, patches and validation sets, so torchrun launches a
small script that calls ``train_model`` with the tiny options of tests/test_train.py, and records
per rank what the test checks: checkpoint writes, losses and a digest of the final weights.
Validating only at the last step, which is then the best, is the case where ranks once disagreed
about a final validation and rank 1 waited alone at its barrier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from napari_spine_tracker.core.models import model_from_checkpoint
from napari_spine_tracker.io.checkpoint import load_checkpoint

RANK_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys
    from pathlib import Path

    from napari_spine_tracker.core import train
    from napari_spine_tracker.core.batches import PatchOptions
    from napari_spine_tracker.io import checkpoint

    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    record = {"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "saves": 0, "losses": []}

    save = checkpoint.save_checkpoint
    def counting_save(*args, **kwargs):
        record["saves"] += 1
        return save(*args, **kwargs)
    checkpoint.save_checkpoint = counting_save  # train imports it when it saves

    close = train._Run.close
    def close_with_digest(run):
        digest = hashlib.sha256()
        for name, value in sorted(run.net.named_parameters()):  # BatchNorm running stats stay per rank
            digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
        record["digest"] = digest.hexdigest()
        close(run)
    train._Run.close = close_with_digest

    options = train.TrainOptions(out=out, steps=4, size="tiny", batch_size=2, pool_size=2, val_every=4,
                                 pool_refresh_every=2, patch=PatchOptions(shape=(8, 32, 32), sessions=2),
                                 validation=(("tiny", 1000),), validation_shape={}, device="cpu")
    train.train_model(options, on_log=lambda r: "loss" in r and record["losses"].append(r["loss"]))
    (out.parent / f"rank{rank}.json").write_text(json.dumps(record))
''')


@pytest.mark.slow
def test_two_process_cpu_training_writes_one_checkpoint_that_loads(tmp_path):
    script = tmp_path / "train_rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["saves"] == 1 and ranks[1]["saves"] == 0  # only rank 0 validates and writes, once
    assert [len(r["losses"]) for r in ranks] == [4, 4]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each process trained on its own batches
    assert ranks[0]["digest"] == ranks[1]["digest"]  # ... and DDP kept the weights identical

    checkpoint = load_checkpoint(out)
    training = checkpoint["training"]
    assert training["processes"] == 2 and training["batch_size"] == 4 and training["steps"] == 4
    model = model_from_checkpoint(checkpoint, device="cpu", name="ddp")
    assert model.voxel_size_um == tuple(checkpoint["voxel_size_um"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.json", "ddp.pt", "rank0.json", "rank1.json",
                                                          "train_rank.py"]  # no resume file, no temp files
