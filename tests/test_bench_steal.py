"""The host's CPU steal, recorded beside every timed benchmark unit: /proc/stat parsing, the share over an
interval, and the batching suite's run dicts carrying it."""

from pathlib import Path

from actors.drafter import NoDrafter
from actors.engine import Engine
from actors.sampling import SamplingParams
from specd.bench.batching import median_run, pair_ratios, run_embedded
from specd.bench.harness import (CpuSteal, CpuTimes, add_times, cpu_times, parse_cpu_line, steal_share,
                                 total_steal_pct)

# A 2-vCPU KVM guest's first /proc/stat line: user nice system idle iowait irq softirq steal guest guest_nice.
LINE = "cpu  4705 150 1120 16250 520 0 17 3000 0 0"


def test_parse_sums_the_first_eight_fields_and_takes_the_eighth_as_steal():
    assert parse_cpu_line(LINE) == CpuTimes(4705 + 150 + 1120 + 16250 + 520 + 0 + 17 + 3000, 3000)
    assert parse_cpu_line(LINE + "\n") == parse_cpu_line(LINE)


def test_parse_without_a_steal_field_is_none():
    assert parse_cpu_line("cpu  4705 150 1120 16250 520 0 17") is None  # a pre-2.6.11 kernel: 7 fields
    assert parse_cpu_line("cpu0 4705 150 1120 16250 520 0 17 3000 0 0") is None  # one CPU's line, not the total
    assert parse_cpu_line("intr 1 2 3 4 5 6 7 8 9") is None
    assert parse_cpu_line("") is None


def test_share_of_two_snapshots_100_jiffies_apart_with_25_stolen():
    start = CpuTimes(total=1000, steal=40)
    assert steal_share(start, CpuTimes(total=1100, steal=65)) == 25.0
    assert steal_share(start, CpuTimes(total=1300, steal=141)) == 33.7  # 101 / 300, one decimal
    assert steal_share(start, start) is None  # no tick elapsed: no share to report
    assert steal_share(None, start) is None and steal_share(start, None) is None


def test_several_intervals_add_up_by_jiffies_not_by_their_shares():
    """A long quiet run and a short stolen one: 10 of 1100 jiffies, not the mean of 0% and 10%."""
    assert add_times([CpuTimes(1000, 0), CpuTimes(100, 10)]) == CpuTimes(1100, 10)
    assert total_steal_pct([{"total": 1000, "steal": 0}, {"total": 100, "steal": 10}]) == 0.9
    assert total_steal_pct([{"total": 1000, "steal": 0}, None]) is None
    assert total_steal_pct([]) is None


def test_a_missing_proc_stat_is_none(tmp_path):
    assert cpu_times(str(tmp_path / "no-such-stat")) is None
    short = tmp_path / "stat"
    short.write_text("cpu  4705 150 1120 16250\ncpu0 1 2 3 4\n")
    assert cpu_times(str(short)) is None
    for path in (short, tmp_path / "no-such-stat"):
        with CpuSteal(str(path)) as s:
            assert s.so_far() is None
        assert s.delta is None and s.pct is None


def _proc_stat_has_steal() -> bool:
    return Path("/proc/stat").exists() and parse_cpu_line(Path("/proc/stat").read_text().splitlines()[0]) is not None


def test_cpu_steal_reads_this_machine_over_a_block():
    assert _proc_stat_has_steal()  # the Linux guest these benchmarks run on
    with CpuSteal() as s:
        first = cpu_times()
        while cpu_times().total - first.total < 20:  # busy until 20 jiffies have passed: a share to compute
            pass
    assert s.delta.total >= 20 and 0 <= s.delta.steal <= s.delta.total
    assert s.pct == round(100 * s.delta.steal / s.delta.total, 1)


def test_run_embedded_records_steal_and_median_run_keeps_every_runs(target):
    engine = Engine(target)
    inputs = [target.tokenizer("abcd")["input_ids"][:4], target.tokenizer("wxyz")["input_ids"][:4]]
    assert [len(ids) for ids in inputs] == [4, 4]
    params = SamplingParams(max_new_tokens=2)
    runs = [run_embedded(engine, NoDrafter(), inputs, params, 2) for _ in range(3)]
    for r in runs:
        assert r["cpu_jiffies"] is not None and set(r["cpu_jiffies"]) == {"total", "steal"}
        j = r["cpu_jiffies"]
        assert r["steal_pct"] == (round(100 * j["steal"] / j["total"], 1) if j["total"] else None)
    median = median_run(runs)
    assert median["runs_steal_pct"] == [r["steal_pct"] for r in runs]
    assert median["runs_tokens_per_second"] == [r["tokens_per_second"] for r in runs]
    assert "steal_pct" in median  # the median run's own


def test_served_over_embedded_is_read_pair_by_pair_not_median_over_median():
    """Repeat i's served run over repeat i's embedded run (taken just before it): a steal burst that slowed
    one pair slows both of its runs, so the pairs' ratios agree where the medians' ratio would not."""
    served = median_run([{"tokens_per_second": t, "steal_pct": p, "rows": []} for t, p in ((45.0, 30.0), (90.0, 1.0), (88.0, 2.0))])
    embedded = median_run([{"tokens_per_second": t, "steal_pct": p, "rows": []} for t, p in ((50.0, 28.0), (100.0, 1.0), (55.0, 25.0))])
    assert pair_ratios(served, embedded) == [0.9, 0.9, 1.6]
    assert served["tokens_per_second"] / embedded["tokens_per_second"] == 88.0 / 55.0  # what medians would say
