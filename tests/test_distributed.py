"""Data-parallel stages 1 and 3 under torchrun: two Gloo processes on the CPU end with identical weights, rank 0
alone writes, Ctrl-C stops every rank after the same step with a loadable checkpoint, and resume continues.

Run as a script (``python -m torch.distributed.run ... tests/test_distributed.py TASK OUT``), this file is the
worker each torchrun process executes; it saves its rank's final weights and the files it wrote into OUT.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("GFENV_TEST_DEVICE", "cpu")  # ``cuda``: the two processes share the GPUs (Gloo) if < 2
SMALL_DATA = {"train_size": 64, "test_size": 32}
STAGE1 = {"dataset_kwargs": SMALL_DATA, "eval_images": 32, "batch_size": 16, "epochs": 1.0, "log_every": 1,
          "accum_steps": 2, "grad_checkpointing": True}  # DDP's no_sync and non-reentrant checkpoints too


def _torchrun(out: Path, nproc: int = 2) -> None:
    """Run this file's worker under torchrun with ``nproc`` Gloo processes of one thread each."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    if DEVICE.startswith("cuda") and torch.cuda.device_count() < nproc:
        env["GFENV_DIST_BACKEND"] = "gloo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One torchrun launch of two Gloo processes: stage 1 stopped by SIGINT on rank 1 in its 2nd step, stage 1
    resumed to the end, stage 3 fine-tuning; ``out/<part>/`` holds each rank's weights and the files it wrote."""
    out = tmp_path_factory.mktemp("two_ranks")
    _torchrun(out)
    return out


def _weights(out: Path, part: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / part / f"rank{rank}.pt", weights_only=True)


def _report(out: Path, part: str, rank: int) -> dict:
    return json.loads((out / part / f"rank{rank}.json").read_text())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_on_one_rank_stops_both_after_the_same_step_with_a_checkpoint(two_ranks):
    from gfenv.checkpoint import load_checkpoint

    run = two_ranks / "run"
    assert [_report(two_ranks, "interrupted", r)["status"] for r in (0, 1)] == ["interrupted"] * 2
    assert _report(two_ranks, "interrupted", 1)["writes"] == []
    assert _report(two_ranks, "interrupted", 0)["writes"] == [str(run / "last.pt")]
    state = _report(two_ranks, "interrupted", 0)["state"]
    assert state == {"iteration": 2, "world_size": 2, "generators": 2}
    w0, w1 = _weights(two_ranks, "interrupted", 0), _weights(two_ranks, "interrupted", 1)
    assert _same(w0, w1)
    resumed = load_checkpoint(run / "last.pt")["model"]
    assert not _same(w0, resumed)  # the resumed run went on from there


def test_two_ranks_resume_and_end_stage1_with_identical_weights_rank0_writing(two_ranks):
    from gfenv.checkpoint import load_checkpoint

    run = two_ranks / "run"
    assert [_report(two_ranks, "resumed", r)["status"] for r in (0, 1)] == ["done"] * 2
    assert _report(two_ranks, "resumed", 1)["writes"] == []
    assert sorted(_report(two_ranks, "resumed", 0)["writes"]) == [str(run / "last.pt"), str(run / "model.pt")]
    assert load_checkpoint(run / "last.pt")["iteration"] == 4  # 64 images / global batch 16
    final = load_checkpoint(run / "model.pt")
    assert final["meta"]["processes"] == 2
    v0, v1 = _weights(two_ranks, "resumed", 0), _weights(two_ranks, "resumed", 1)
    assert _same(v0, v1) and _same(v0, final["model"])


def test_two_ranks_finetune_stage3_to_identical_weights_rank0_writing(two_ranks):
    from gfenv.checkpoint import load_model
    from gfenv.env import DEFAULT_CHECKPOINT

    path = two_ranks / "stage3.pt"
    w0, w1 = _weights(two_ranks, "stage3", 0), _weights(two_ranks, "stage3", 1)
    assert _same(w0, w1)
    assert _report(two_ranks, "stage3", 1)["writes"] == []
    assert _report(two_ranks, "stage3", 0)["writes"] == [str(path)]
    model, meta = load_model(path)
    assert _same(w0, model.state_dict())
    assert meta["episodes"] == 64 and meta["processes"] == 2 and meta["updates"] == 2
    shipped, _ = load_model(DEFAULT_CHECKPOINT)
    assert not torch.equal(model.classifier.head.weight, shipped.classifier.head.weight)
    assert not torch.equal(model.focus_encoder.features[0].weight, shipped.focus_encoder.features[0].weight)
    assert torch.equal(model.glance_encoder.features[0].weight, shipped.glance_encoder.features[0].weight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_torchrun_process_trains_the_same_weights_as_a_plain_run(tmp_path, monkeypatch):
    """A one-process group (DDP, sharding, rank seeds, gathered generators) changes nothing, bit for bit."""
    import torch.distributed

    from gfenv.checkpoint import load_checkpoint
    from gfenv.train.stage1 import Stage1Config, train_stage1

    plain = train_stage1(Stage1Config(**STAGE1), tmp_path / "plain", progress=False)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    ddp = train_stage1(Stage1Config(**STAGE1), tmp_path / "ddp", progress=False)
    assert not torch.distributed.is_initialized()  # train_stage1 left the group it created
    a, b = load_checkpoint(plain)["model"], load_checkpoint(ddp)["model"]
    assert _same(a, b)


def test_helpers_without_torchrun_are_no_ops(monkeypatch):
    from gfenv.train import distributed as dist

    for name in dist.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not dist.launched() and dist.world_size() == 1 and dist.is_main()
    idx = torch.arange(10)
    assert dist.shard(idx) is idx and dist.per_rank(7) == 7 and dist.rank_seed(5) == 5
    with dist.distributed("cpu") as device:
        assert device == torch.device("cpu") and not dist.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model, torch.device("cpu")) is model
    with dist.GracefulStop() as stop:
        assert not stop.requested()
    monkeypatch.setenv(dist.BACKEND_VAR, "nccl")
    with pytest.raises(ValueError, match="NCCL backend needs CUDA"):
        dist.backend_for(torch.device("cpu"))


# ------------------------------------------------------------------------------------------------------------------
# The worker each torchrun process runs.


def _worker(out: Path) -> None:
    import gfenv.train.stage1 as training
    import gfenv.train.stage3 as stage3
    from agents import make_agent
    from gfenv.checkpoint import load_checkpoint
    from gfenv.train import distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    writes: list[str] = []
    models: list[torch.nn.Module] = []

    def spy(real, log):
        def record(path, *args, **kwargs):
            log.append(str(path))
            return real(path, *args, **kwargs)
        return record

    def keep(real, log):
        return lambda *args, **kwargs: log.append(real(*args, **kwargs)) or log[-1]

    def report(part: str, weights: dict, **extra) -> None:
        (out / part).mkdir(exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, out / part / f"rank{rank}.pt")
        (out / part / f"rank{rank}.json").write_text(json.dumps({"writes": writes, **extra}))
        writes.clear()
        models.clear()

    training.save_checkpoint = spy(training.save_checkpoint, writes)
    stage3.save_model = spy(stage3.save_model, writes)
    training.GFNetModel = keep(training.GFNetModel, models)
    stage3.Stage3Wrapper = keep(stage3.Stage3Wrapper, models)
    real_loss, calls = training.stage1_loss, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3 and rank == 1:  # the first micro-batch of step 2
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C (or torchrun passing it on) sends
        return real_loss(*args, **kwargs)

    with dist.distributed(DEVICE):  # one group for the three parts (each part would otherwise join and leave)
        training.stage1_loss = interrupted
        try:
            training.train_stage1(training.Stage1Config(**STAGE1, device=DEVICE), out / "run", progress=False)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
        state = load_checkpoint(out / "run" / "last.pt")
        state = {"iteration": state["iteration"], "world_size": state["world_size"],
                 "generators": len(state["generators"])}
        report("interrupted", models[0].state_dict(), status=status, state=state)
        training.stage1_loss = real_loss
        training.train_stage1(training.Stage1Config(**STAGE1, device=DEVICE), out / "run", resume=True,
                              progress=False)
        report("resumed", models[0].state_dict(), status="done")
        config = stage3.Stage3Config(update_every=32, batch_size=32)
        stage3.finetune(make_agent("random", seed=0), {"checkpoint": "default", "dataset_kwargs": SMALL_DATA},
                        episodes=64, config=config, progress=False, path=out / "stage3.pt", num_envs=32,
                        device=DEVICE)
        report("stage3", models[0].trainable_model.state_dict())


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
