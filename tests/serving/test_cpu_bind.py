"""EngineSettings.cpu_threads_bind -> vLLM's VLLM_CPU_OMP_THREADS_BIND, per student replica."""

import pytest

from mode_cotd.errors import ConfigError
from serving.engine import cpu_threads_bind


@pytest.mark.parametrize("setting", ["auto", "nobind", "0", "1-3", "0,2,4-5", "0-3|4-7"])
def test_vllm_values_pass_through(setting):
    assert cpu_threads_bind(setting, 3, [0, 1]) == setting


def test_per_replica_gives_each_local_replica_its_own_core():
    cores = [4, 2, 6]  # the process may use these, in any order
    assert [cpu_threads_bind("per-replica", rank, cores) for rank in range(4)] == ["2", "4", "6", "2"]


@pytest.mark.parametrize("setting", ["", "per_replica", "0-", "all", "1;2", "0|", "|1"])
def test_bad_values_are_refused_by_name(setting):
    with pytest.raises(ConfigError, match="engine.cpu_threads_bind"):
        cpu_threads_bind(setting, 0, [0, 1])


def test_per_replica_without_cores_is_refused():
    with pytest.raises(ConfigError, match="no core"):
        cpu_threads_bind("per-replica", 0, [])
