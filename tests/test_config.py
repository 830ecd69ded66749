"""config.toml: the shipped file is valid and complete; bad values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcsp_hook import config
from fcsp_hook.errors import ConfigError
from fcsp_hook.slot import abi

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_equals_the_defaults() -> None:
    """etc/config.toml documents every default, with the values the code uses."""
    assert config.load(REPO / "etc" / "config.toml") == config.Config()


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    """A host without /etc/fcsp/config.toml runs on the defaults."""
    assert config.load(tmp_path / "absent.toml") == config.Config()


def test_an_unchanged_file_is_parsed_once_and_a_changed_one_again(tmp_path: Path) -> None:
    """fcsp-hookd's forks read the config the service loaded before forking: the same bytes
    give the same (frozen) Config without a parse; an edit is read at once."""
    path = tmp_path / "config.toml"
    path.write_text('[hook]\nfailure_policy = "fail-open"\n')
    first = config.load(path)
    assert config.load(path) is first
    path.write_text('[hook]\nfailure_policy = "fail-closed"\n')
    assert config.load(path).hook.failure_policy == config.FAIL_CLOSED
    path.write_text("[hook]\nfailure_policy = 1\n")
    with pytest.raises(ConfigError):
        config.load(path)


def test_values_are_read(tmp_path: Path) -> None:
    """Each section's keys reach the Config."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[defaults]\nmode = "strict"\nmem_mode = "soft"\n'
        '[hook]\nfailure_policy = "fail-open"\n[paths]\nrun_dir = "/tmp/x"\n'
        "[policy]\ntenant_floor_pct = 10\nshared_pool_pct = 30\nburst_max_pct = 60\n"
    )
    cfg = config.load(path)
    assert cfg.defaults.mode == abi.IsolationMode.STRICT
    assert cfg.defaults.mem_mode == abi.MemMode.SOFT
    assert cfg.hook.failure_policy == config.FAIL_OPEN
    assert cfg.paths.run_dir == Path("/tmp/x")
    assert cfg.policy == config.PolicyConfig(10, 30, 60)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[defaults]\nmode = 'fast'\n",
            "[defaults] mode = 'fast' is invalid: expected one of none",
        ),
        ("[hook]\nfailure_policy = 'maybe'\n", "expected one of fail-closed, fail-open"),
        ("[hook]\nlibrary = 'relative/lib.so'\n", "expected an absolute path"),
        ("[policy]\ntenant_floor_pct = 101\n", "expected an integer from 0 to 100"),
        ("[policy]\ntenant_floor_pct = true\n", "expected an integer from 0 to 100"),
        ("[policy]\ntenant_floor_pct = 50\nshared_pool_pct = 40\n", "must not exceed 100"),
        ("[hook]\nlibary = '/x'\n", "[hook] libary is unknown"),
        ("[hooks]\n", "[hooks] is unknown"),
        ("defaults = 3\n", "[defaults] must be a table"),
        ("[defaults\n", "not valid TOML"),
        (
            "[observer]\nclock_normalise = 'on'\n",
            "[observer] clock_normalise = 'on' is invalid: expected one of off, full-load",
        ),
        ("[backend]\ndefault = 'mig'\n", "expected one of timeslice, mps"),
        ("[observer]\nturn_cycle_ms = 5\n", "turn_cycle_ms must be 0 (off) or 10-1000, got 5"),
        ("[observer]\nturn_cycle_ms = 2000\n", "expected an integer from 0 to 1000"),
        (
            "[admission]\npolicy = 'deny'\n",
            "[admission] policy = 'deny' is invalid: expected one of refuse, warn, off",
        ),
        ("[admission]\nmode = 'refuse'\n", "[admission] mode is unknown: expected one of policy"),
        (
            "[observer]\nmetrics_address = 'localhost'\n",
            "[observer] metrics_address = 'localhost' is invalid: expected an IPv4 or IPv6 "
            "address such as 127.0.0.1, 0.0.0.0 or ::",
        ),
        ("[observer]\nmetrics_address = '10.0.0.256'\n", "expected an IPv4 or IPv6 address"),
        ("[observer]\nmetrics_address = 'fe80:::1'\n", "expected an IPv4 or IPv6 address"),
        ("[observer]\nmetrics_address = 9401\n", "expected an IPv4 or IPv6 address"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Typos and bad values are refused with the section, the key and the accepted form."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_observer_config_section_is_validated(tmp_path: Path) -> None:
    """[observer] values are range-checked and the over-quota action is a choice."""
    path = tmp_path / "c.toml"
    path.write_text("[observer]\nover_quota_action = 'shoot'\n")
    with pytest.raises(config.ConfigError, match="expected one of warn, kill"):
        config.load(path)
    path.write_text("[observer]\nnvml_interval_ms = 10\n")
    with pytest.raises(config.ConfigError, match="from 1000 to"):
        config.load(path)
    path.write_text("[observer]\ncontention_low_pct = 60\ncontention_high_pct = 50\n")
    with pytest.raises(config.ConfigError, match="must not exceed contention_high_pct"):
        config.load(path)


def test_admission_and_metrics_address_are_read(tmp_path: Path) -> None:
    """[admission] policy defaults to refuse and takes warn or off; [observer]
    metrics_address defaults to 127.0.0.1 and takes any IPv4 or IPv6 address."""
    assert config.Config().admission.policy == "refuse"
    assert config.Config().observer.metrics_address == "127.0.0.1"
    path = tmp_path / "c.toml"
    for policy in ("refuse", "warn", "off"):
        path.write_text(f"[admission]\npolicy = '{policy}'\n")
        assert config.load(path).admission.policy == policy
    for address in ("0.0.0.0", "10.1.2.3", "::", "::1", "fd00::42"):  # noqa: S104  # a value under test
        path.write_text(f"[observer]\nmetrics_address = '{address}'\n")
        assert config.load(path).observer.metrics_address == address
