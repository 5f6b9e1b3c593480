"""Several processes: each trains on its shard, gradients are synchronised by accelerate (DDP over gloo on
CPUs), and the result equals one process with the same global batch. Only the main process writes."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtpkit import train
from mtpkit.attach import attach
from mtpkit.config import CHECKPOINT_DIR, METRICS_NAME, WEIGHTS_NAME, HeadsConfig
from tests.conftest import CORPUS

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, batch_size, processes", [(51, 4, 2), (8, 4, 2), (13, 2, 3), (20, 8, 1)])
def test_shards_partition_the_data_and_hold_every_sequence_a_process_trains_on(n, batch_size, processes):
    columns = batch_size * processes
    shards = [train.shard(n, batch_size, processes, rank, seed=3) for rank in range(processes)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # a partition: each sequence in one shard
    assert max(map(len, shards)) - min(map(len, shards)) <= batch_size
    for epoch in range(3):
        order = train.epoch_order(n, columns, seed=3, epoch=epoch)
        assert sorted(order) == list(range(n))
        for rank, own in enumerate(shards):
            seen = {i for row in range(0, n, columns) for i in order[row + rank * batch_size: row + (rank + 1) * batch_size]}
            assert seen == set(own), (epoch, rank)
    assert train.epoch_order(n, columns, 3, 0) == torch.randperm(n, generator=torch.Generator().manual_seed(3000)).tolist()
    if n > columns:  # later epochs regroup the sequences into new micro-batches
        first, second = train.epoch_order(n, columns, 3, 0), train.epoch_order(n, columns, 3, 1)
        assert {frozenset(first[i: i + columns]) for i in range(0, n, columns)} != \
               {frozenset(second[i: i + columns]) for i in range(0, n, columns)}


def test_two_cpu_processes_equal_one_process_with_the_global_batch(tiny_model_dirs, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS * 2))
    fresh = tmp_path / "fresh"
    attach(str(tiny_model_dirs["llama"]), "sequential", 3, 1, fresh)
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(fresh, one)
    shutil.copytree(fresh, two)
    # 51 training sequences, global micro-batch 8: 7 micro-batches an epoch, the last holding 3 (all on
    # process 0: process 1 takes part with an empty share), 4 steps an epoch with --grad-accum 2
    settings = dict(epochs=2, grad_accum=2, eval_fraction=0.2, eval_every=2, save_every=3, lr=1e-2, loss="ce", seed=0)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mtpkit", "finetune", str(two), "--data", str(data), "--batch-size", "4"]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    launched = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = launched.stdout + launched.stderr
    assert launched.returncode == 0, output[-3000:]

    single = train.finetune(one, train.FinetuneOptions(data=[str(data)], batch_size=8, **settings))

    training = HeadsConfig.read(two).training
    assert training["processes"] == 2 and training["batch_size"] == 4
    per_process = training["sequences_per_process"]
    assert sum(per_process["train"]) == training["train_sequences"] == single.train_sequences == 51
    assert per_process["train"] == [27, 24]  # each process computed the hidden states of its shard only
    assert sum(per_process["eval"]) == training["eval_sequences"] == 13 and per_process["eval"] == [7, 6]

    expected, got = load_file(str(one / WEIGHTS_NAME)), load_file(str(two / WEIGHTS_NAME))
    assert expected.keys() == got.keys()
    moved = load_file(str(fresh / WEIGHTS_NAME))
    assert any(not torch.equal(expected[k], moved[k]) for k in moved)
    for name in expected:  # float32; only the order of the gradient sums differs
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)

    # the held-out metrics are the global ones: both processes' shares added up
    assert training["eval"]["examples"] == 13
    assert training["eval"]["head_top1"] == pytest.approx(single.eval["head_top1"], abs=1e-4)
    assert max(training["eval"]["head_top5"]) > 0

    # only the main process wrote and reported
    lines = (two / METRICS_NAME).read_text().splitlines()
    assert not [line for line, n in Counter(lines).items() if n > 1]
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "eval" in r] == [2, 4, 6, 8]
    single_losses = [json.loads(line)["loss"] for line in (one / METRICS_NAME).read_text().splitlines()
                     if "loss" in json.loads(line)]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(single_losses, abs=1e-4)
    assert output.count("mtpkit finetune: sequential x3") == 1 and output.count("held-out accuracy") == 1
    assert output.count("step 2: eval top-1 per head") == 1 and output.count("caching hidden states") == 1
    assert not (two / CHECKPOINT_DIR).exists()


@pytest.mark.parametrize("kind, refused", [("NO", None), ("MULTI_CPU", None), ("MULTI_GPU", None),
                                           ("FSDP", "not FSDP"), ("DEEPSPEED", "not DeepSpeed")])
def test_finetune_refuses_fsdp_and_deepspeed_in_one_line(kind, refused):
    """accelerate selects FSDP and DeepSpeed on GPUs only, so the decision is checked on its own: the heads train
    on one process or under DDP (the two-process run above), and FSDP or DeepSpeed is one clear line."""
    from accelerate import DistributedType

    from mtpkit.errors import MtpkitError
    from mtpkit.train.recipe import check_distributed_type

    if refused is None:
        check_distributed_type(DistributedType[kind])
    else:
        with pytest.raises(MtpkitError, match=refused) as error:
            check_distributed_type(DistributedType[kind])
        assert "\n" not in str(error.value)
