"""Training runs unchanged under torch.distributed (DDP on CPU, gloo; started with
``accelerate launch --config_file configs/accelerate_ddp_cpu.yaml`` and with torchrun): two processes give the
loss curve of one process with the same global batch, and Trainer checkpoints written by rank 0
resume in either setting and continue that curve.

Data order is identical in both settings: the Trainer's sampler is seeded (same permutation for
any world size) and accelerate hands consecutive per-process batches to the ranks, so the global
batch of step i holds the same sequences with 1 x 4 or 2 x 2. DDP averages the two half-batch
gradients, which equals the full-batch mean gradient; only float summation order differs.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS, SAVE_AT = 4, 10, 5
RTOL = 2e-4  # relative, per logged step loss (observed differences ~1e-6)

SCRIPT = """
import json, sys
from strata.training.train import train_model

out, corpus, batch, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
result = train_model(arch="retmamba", preset="fusion-tiny", corpus=corpus, output_dir=out, max_steps=%d,
                     seq_len=32, batch_size=batch, lr=3e-3, warmup_steps=2, logging_steps=1, save_steps=%d,
                     eval_max_blocks=4, progress=False, use_cpu=True, seed=0,
                     resume_from_checkpoint=None if resume == "-" else resume)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    losses = {e["step"]: e["loss"] for e in result.log_history if "loss" in e}
    with open(out + "/losses.json", "w") as f:
        json.dump(losses, f)
""" % (STEPS, SAVE_AT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    (work / "train_script.py").write_text(SCRIPT)
    return work


def run(work: Path, name: str, nproc: int, resume: str = "-", launcher: str = "torchrun") -> dict[int, float]:
    out = work / name
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    args = [str(work / "train_script.py"), str(out), "lunyu", str(GLOBAL_BATCH // nproc), resume]
    if nproc == 1:
        cmd = [sys.executable] + args
    elif launcher == "accelerate":  # the shipped config, as docs/distributed.md tells users to run it
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate_ddp_cpu.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(free_port())] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + args
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    losses = json.loads((out / "losses.json").read_text())
    return {int(step): loss for step, loss in losses.items()}


def assert_same_curve(ours: dict[int, float], reference: dict[int, float], steps):
    for step in steps:
        assert ours[step] == pytest.approx(reference[step], rel=RTOL), (step, ours, reference)


@pytest.fixture(scope="module")
def runs(workdir):
    return {"1proc": run(workdir, "one", 1), "2proc": run(workdir, "two", 2, launcher="accelerate")}


def test_two_processes_give_the_one_process_loss_curve(runs, workdir):
    one, two = runs["1proc"], runs["2proc"]
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert one[STEPS] < one[1]  # it learns
    assert_same_curve(two, one, range(1, STEPS + 1))
    # rank 0 alone wrote the Hub-ready folder and the checkpoints
    assert (workdir / "two" / "model.safetensors").is_file()
    assert (workdir / "two" / "checkpoints" / f"checkpoint-{SAVE_AT}" / "model.safetensors").is_file()


def test_two_process_checkpoint_resumes_in_one_process(runs, workdir):
    resumed = run(workdir, "two-then-one", 1, str(workdir / "two" / "checkpoints" / f"checkpoint-{SAVE_AT}"))
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1-5 come from the checkpoint's log history
    assert_same_curve(resumed, runs["1proc"], range(SAVE_AT + 1, STEPS + 1))


def test_one_process_checkpoint_resumes_in_two_processes(runs, workdir):
    resumed = run(workdir, "one-then-two", 2, str(workdir / "one" / "checkpoints" / f"checkpoint-{SAVE_AT}"))
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1-5 come from the checkpoint's log history
    assert_same_curve(resumed, runs["1proc"], range(SAVE_AT + 1, STEPS + 1))


@pytest.mark.parametrize("name,kind,nproc", [("accelerate_ddp_cpu.yaml", "MULTI_GPU", 2), ("accelerate_fsdp.yaml", "FSDP", 8)])
def test_shipped_accelerate_configs_parse(name, kind, nproc):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / name))
    assert (config.distributed_type.value, config.num_processes) == (kind, nproc)
