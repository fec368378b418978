"""rayweights.train.data: the in-memory shard (read once, reshuffled every epoch) and the size switch;
the worker's phase timer and training-state fingerprint."""

import pytest
import torch

from rayweights.config import ConfigError, from_dict
from rayweights.train import GeneratorTrainConfig
from rayweights.train.data import InMemoryShard, shard_megabytes
from rayweights.train.worker import PhaseTimer, effective_zero_stage, state_fingerprint


class _Shard:
    """What Ray Train's dataset shard offers: iter_torch_batches over rows; counts how often it is read."""

    def __init__(self, n):
        self.rows = {"block": torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4),
                     "block_index": torch.arange(n), "cond_id": torch.arange(n) % 3}
        self.reads = 0

    def iter_torch_batches(self, batch_size, **_):
        self.reads += 1
        n = len(self.rows["block_index"])
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.rows.items()}


def test_in_memory_shard_reads_once_and_reshuffles_every_epoch():
    src = _Shard(103)
    mem = InMemoryShard(src, read_batch=10)
    assert mem.rows == 103 and src.reads == 1
    e0 = [b["block_index"] for b in mem.epoch(8, seed=0)]
    e1 = [b["block_index"] for b in mem.epoch(8, seed=1)]
    assert src.reads == 1                                         # epochs come from memory
    assert len(e0) == 103 // 8 and all(len(b) == 8 for b in e0)   # full batches, tail dropped
    seen = torch.cat(e0)
    assert len(set(seen.tolist())) == len(seen)                   # no row twice in an epoch
    assert not torch.equal(torch.cat(e0), torch.cat(e1))          # a new order every epoch
    assert torch.equal(torch.cat(e0), torch.cat([b["block_index"] for b in mem.epoch(8, seed=0)]))
    b = next(mem.epoch(8, seed=3))                                # columns stay aligned row by row
    assert torch.equal(b["block"][:, 0].long(), b["block_index"]) and torch.equal(b["cond_id"], b["block_index"] % 3)


def test_data_in_memory_is_checked_at_load():
    with pytest.raises(ConfigError, match="data_in_memory"):
        from_dict(GeneratorTrainConfig, {"method": "pdiff", "data_in_memory": "sometimes"})
    with pytest.raises(ConfigError, match="in_memory_max_mb"):
        from_dict(GeneratorTrainConfig, {"method": "pdiff", "in_memory_max_mb": -1})


def test_shard_size_counts_rows_per_worker():
    class Layout:
        block_size, num_blocks = 64, 7

    class Zoo:
        layout = Layout()

        class members:                                           # noqa: N801 - a pyarrow.Table stand-in
            column_names = ["checkpoints"]

            @staticmethod
            def column(name):
                class C:
                    @staticmethod
                    def to_pylist():
                        return [[1, 2, 3, 4]] * 100
                return C

    per_block_row = (64 * 4 + 16) / 2**20
    assert shard_megabytes(Zoo, "block", 1) == pytest.approx(400 * 7 * per_block_row)
    assert shard_megabytes(Zoo, "block", 4) == pytest.approx(100 * 7 * per_block_row)
    assert shard_megabytes(Zoo, "checkpoint", 2) == pytest.approx(200 * (7 * 64 * 4 + 8) / 2**20)


def test_one_worker_runs_zero_0_for_zero_1_and_2_only():
    assert [effective_zero_stage(s, 1) for s in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert [effective_zero_stage(s, 2) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]


def test_phase_timer_splits_a_steps_time_into_its_phases():
    now = [0.0]
    t = PhaseTimer(clock=lambda: now[0])
    for _ in range(4):                               # 4 steps: 1 ms data, 3 ms forward, 6 ms backward
        for phase, dt in (("data", 1e-3), ("forward", 3e-3), ("backward", 6e-3)):
            now[0] += dt
            t.lap(phase)
    ms = t.report(4)
    assert ms == pytest.approx({"ms_data": 1.0, "ms_prepare": 0.0, "ms_forward": 3.0, "ms_backward": 6.0,
                                "ms_step": 0.0, "ms_report": 0.0})
    now[0] += 5.0                                    # time before start() (between epochs) is not counted
    t.start()
    now[0] += 2e-3
    t.lap("step")
    assert t.report(1)["ms_step"] == pytest.approx(2.0) and sum(t.report(1).values()) == 0.0


def test_state_fingerprint_sees_every_parameter_and_optimizer_moment():
    def trained(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            model(torch.randn(5, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    model, opt = trained(0)
    fp = state_fingerprint(model, opt)
    assert len(fp) == 64 and fp == state_fingerprint(model, opt) == state_fingerprint(*trained(0))
    assert state_fingerprint(model) != fp                       # the optimiser state counts
    twin, twin_opt = trained(0)                                 # a copy through state_dicts: the same
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    assert state_fingerprint(twin, twin_opt) == fp
    with torch.no_grad():                                       # one parameter element, by the smallest step
        p = model[1].bias
        p[0] = torch.nextafter(p[0], torch.tensor(float("inf")))
    assert state_fingerprint(model, opt) != fp
    model, opt = trained(0)
    opt.state[model[0].weight]["exp_avg_sq"][2, 1] *= 1.5       # one second moment element
    assert state_fingerprint(model, opt) != fp
    model, opt = trained(0)
    opt.state[model[0].weight]["step"] += 1                     # the step count
    assert state_fingerprint(model, opt) != fp
    assert state_fingerprint(*trained(1)) != fp
