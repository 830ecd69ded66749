"""fcsp.* annotation parsing: accepted forms, and one clear line for everything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcsp_hook.annotations import MemQuota, MemSpill, TenantRequest, parse
from fcsp_hook.errors import AnnotationError
from fcsp_hook.slot import abi

G = 1 << 30


def _one(annotations: dict[str, str], devices: int = 1) -> TenantRequest:
    return parse(annotations, devices)


@pytest.mark.parametrize(
    ("value", "centi"),
    [("1", 100), ("40", 4000), ("12.5", 1250), ("99.99", 9999), ("100", 10000), ("0.5", None)],
)
def test_sm_values(value: str, centi: int | None) -> None:
    """fcsp.sm takes 1 to 100 percent with up to two decimals; below 1 is refused."""
    if centi is None:
        with pytest.raises(AnnotationError):
            _one({"fcsp.sm": value})
    else:
        assert _one({"fcsp.sm": value}).devices[0].sm_centi == centi


@pytest.mark.parametrize(
    ("value", "quota"),
    [
        ("512M", MemQuota(bytes=512 << 20)),
        ("8G", MemQuota(bytes=8 * G)),
        ("1.5G", MemQuota(bytes=3 * G // 2)),
        ("8Gi", MemQuota(bytes=8 * G)),
        ("8GiB", MemQuota(bytes=8 * G)),
        ("2T", MemQuota(bytes=2 << 40)),
        ("1024K", MemQuota(bytes=1 << 20)),
        ("50%", MemQuota(basis_points=5000)),
        ("12.5%", MemQuota(basis_points=1250)),
        ("100%", MemQuota(basis_points=10000)),
    ],
)
def test_mem_values(value: str, quota: MemQuota) -> None:
    """fcsp.mem takes binary-suffixed sizes and percentages of the GPU's memory."""
    assert _one({"fcsp.mem": value}).devices[0].mem == quota


def test_defaults_without_annotations_values() -> None:
    """Unset keys mean the whole GPU, no memory quota, the configured modes, best effort."""
    request = parse({"fcsp.tenant": "a"}, 2, abi.IsolationMode.STRICT, abi.MemMode.SOFT)
    assert [d.sm_centi for d in request.devices] == [10000, 10000]
    assert all(d.mem.unlimited for d in request.devices)
    assert request.mode == abi.IsolationMode.STRICT
    assert request.mem_mode == abi.MemMode.SOFT
    assert request.priority == abi.Priority.BEST_EFFORT


def test_per_device_keys_override_the_default() -> None:
    """fcsp.sm.<i> and fcsp.mem.<i> apply to the i-th GPU; the others keep fcsp.sm/fcsp.mem."""
    request = parse({"fcsp.sm": "30", "fcsp.sm.1": "70", "fcsp.mem": "4G", "fcsp.mem.0": "25%"}, 3)
    assert [d.sm_centi for d in request.devices] == [3000, 7000, 3000]
    assert [d.mem for d in request.devices] == [
        MemQuota(basis_points=2500),
        MemQuota(bytes=4 * G),
        MemQuota(bytes=4 * G),
    ]


def test_modes_priority_and_tenant() -> None:
    """The enumerated keys map to the slot's enums; tenant is kept as given."""
    request = _one(
        {
            "fcsp.mode": "adaptive",
            "fcsp.mem-mode": "soft",
            "fcsp.priority": "latency",
            "fcsp.tenant": "team-a.prod_1",
        }
    )
    assert request.mode == abi.IsolationMode.ADAPTIVE
    assert request.mem_mode == abi.MemMode.SOFT
    assert request.priority == abi.Priority.LATENCY
    assert request.tenant == "team-a.prod_1"


@pytest.mark.parametrize(
    ("value", "spill"),
    [
        (None, MemSpill(centi=10_000)),  # 1x the quota unless told
        ("1.5x", MemSpill(centi=15_000)),
        ("0.25x", MemSpill(centi=2_500)),
        ("100x", MemSpill(centi=1_000_000)),
        ("12G", MemSpill(bytes=12 * G, centi=0)),
    ],
)
def test_spill_mode_and_its_bound(value: str | None, spill: MemSpill) -> None:
    """fcsp.mem-mode=spill, bounded past the quota by bytes or a multiple of the quota."""
    given = {"fcsp.mem": "8G", "fcsp.mem-mode": "spill", "fcsp.uvm-profile": "training"}
    if value is not None:
        given["fcsp.mem-spill"] = value
    request = _one(given)
    assert request.mem_mode == abi.MemMode.SPILL
    assert request.mem_spill == spill
    assert request.uvm_profile == "training"


def test_a_spill_bound_without_spill_mode_is_refused() -> None:
    """fcsp.mem-spill under a hard quota would silently do nothing: it is an error."""
    with pytest.raises(AnnotationError) as err:
        _one({"fcsp.mem": "8G", "fcsp.mem-spill": "1.5x"})
    assert str(err.value) == (
        "annotation fcsp.mem-spill needs fcsp.mem-mode=spill: expected both or neither"
    )


def test_other_annotations_are_not_ours() -> None:
    """Keys outside fcsp. (io.podman..., xfcsp.sm) are ignored, not rejected."""
    request = _one({"io.podman.annotations.init": "FALSE", "xfcsp.sm": "abc", "fcsp.sm": "40"})
    assert request.devices[0].sm_centi == 4000


BAD = [
    ("fcsp.sm", "abc", "expected a percentage of the GPU from 1 to 100"),
    ("fcsp.sm", "0", "expected a percentage"),
    ("fcsp.sm", "101", "expected a percentage"),
    ("fcsp.sm", "-5", "expected a percentage"),
    ("fcsp.sm", "1e99", "expected a percentage"),
    ("fcsp.sm", "", "expected a percentage"),
    ("fcsp.sm", "４０", "expected a percentage"),  # noqa: RUF001  # full-width digits on purpose
    ("fcsp.sm", "40 ", "expected a percentage"),
    ("fcsp.mem", "8GB?", "expected bytes with a binary suffix"),
    ("fcsp.mem", "abc", "expected bytes"),
    ("fcsp.mem", "0", "expected bytes"),
    ("fcsp.mem", "0M", "expected bytes"),
    ("fcsp.mem", "-5G", "expected bytes"),
    ("fcsp.mem", "1e99", "expected bytes"),
    ("fcsp.mem", "", "expected bytes"),
    ("fcsp.mem", "101%", "expected bytes"),
    ("fcsp.mem", "0%", "expected bytes"),
    ("fcsp.mem", "512K", "from 1M to 1024T"),
    ("fcsp.mem", "2000T", "from 1M to 1024T"),
    ("fcsp.mem", "8gb", "expected bytes"),
    ("fcsp.mem-mode", "medium", "expected hard, soft or spill"),
    ("fcsp.mem-spill", "abc", "expected bytes as for fcsp.mem (e.g. 8G) or a multiple"),
    ("fcsp.mem-spill", "50%", "or a multiple of the quota"),
    ("fcsp.mem-spill", "0x", "or a multiple of the quota"),
    ("fcsp.mem-spill", "101x", "or a multiple of the quota"),
    ("fcsp.mem-spill", "1.5", "or a multiple of the quota"),
    ("fcsp.mem-spill", "1.5X", "or a multiple of the quota"),
    ("fcsp.uvm-profile", "llm", "expected default or llm_inference or training"),
    ("fcsp.mode", "STRICT", "expected none, balanced, strict or adaptive"),
    ("fcsp.priority", "urgent", "expected latency or best-effort"),
    ("fcsp.tenant", "", "expected 1 to 63 characters"),
    ("fcsp.tenant", "a b", "expected 1 to 63 characters"),
    ("fcsp.tenant", "x" * 64, "expected 1 to 63 characters"),
    ("fcsp.tenant", "ténant", "expected 1 to 63 characters"),
    ("fcsp.sm.1", "40", "GPU index 1 is out of range"),
    ("fcsp.mem.7", "1G", "GPU index 7 is out of range"),
    ("fcsp.sm.01", "40", "is unknown"),
    ("fcsp.sm.x", "40", "is unknown"),
    ("fcsp.memory", "8G", "is unknown"),
    ("fcsp.", "1", "is unknown"),
]


@pytest.mark.parametrize(("key", "value", "form"), BAD)
def test_malformed_values_give_one_line_naming_key_value_and_form(
    key: str, value: str, form: str
) -> None:
    """Each malformed annotation raises one line naming the key, the value and the form."""
    with pytest.raises(AnnotationError) as info:
        _one({key: value})
    message = str(info.value)
    assert "\n" not in message
    assert key in message
    assert form in message
    if "unknown" not in form:
        assert f'{key}="' in message


def test_per_device_key_without_any_gpu_says_so() -> None:
    """A per-GPU key on a container that sees no GPU names that fact."""
    with pytest.raises(AnnotationError, match="the container sees no GPU"):
        parse({"fcsp.sm.0": "40"}, 0)


def test_long_and_control_values_are_escaped_and_bounded() -> None:
    """Newlines, escapes and huge values never break the one-line rule."""
    with pytest.raises(AnnotationError) as info:
        _one({"fcsp.sm": "4\n0" + "9" * 500})
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 300


fcsp_keys = st.one_of(
    st.sampled_from(
        [
            "fcsp.sm",
            "fcsp.mem",
            "fcsp.mem-mode",
            "fcsp.mode",
            "fcsp.priority",
            "fcsp.tenant",
            "fcsp.sm.0",
            "fcsp.mem.3",
            "fcsp.sm.16",
        ]
    ),
    st.text(min_size=0, max_size=12).map(lambda s: "fcsp." + s),
)


@given(st.dictionaries(fcsp_keys, st.text(max_size=40), max_size=4), st.integers(0, 20))
def test_any_input_parses_or_fails_with_one_clean_line(
    annotations: dict[str, str], devices: int
) -> None:
    """Fuzz: whatever the keys and values, parse returns a request within bounds or raises
    AnnotationError with one line; no other exception escapes."""
    try:
        request = parse(annotations, devices)
    except AnnotationError as exc:
        message = str(exc)
        assert message.startswith("annotation fcsp.")
        assert "\n" not in message and "\r" not in message
        assert message.isascii()
        return
    assert len(request.devices) == min(devices, abi.MAX_DEVICES)
    for dev in request.devices:
        assert 100 <= dev.sm_centi <= 10000
        assert 0 <= dev.mem.basis_points <= 10000
        assert dev.mem.bytes == 0 or (1 << 20) <= dev.mem.bytes <= (1024 << 40)


@given(st.integers(1, 9_999_999))
def test_any_mebibyte_count_round_trips(mib: int) -> None:
    """Every size written as whole mebibytes (up to 7 digits) parses to the same byte count."""
    assert _one({"fcsp.mem": f"{mib}M"}).devices[0].mem.bytes == mib << 20


GOOD = [
    ("fcsp.sm", "40"),
    ("fcsp.uvm-profile", "llm_inference"),
    ("fcsp.sm.0", "40"),
    ("fcsp.mem", "8G"),
    ("fcsp.mem", "50%"),
    ("fcsp.mem.0", "1.5Gi"),
    ("fcsp.mem-mode", "hard"),
    ("fcsp.mode", "strict"),
    ("fcsp.priority", "latency"),
    ("fcsp.tenant", "team-a"),
]


@pytest.mark.parametrize("control", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\u2028"])
@pytest.mark.parametrize(("key", "value"), GOOD)
def test_a_control_character_after_a_good_value_is_refused(
    key: str, value: str, control: str
) -> None:
    """A regex's `$` also matches before a trailing newline, so "40\\n" once passed as 40 and
    a tenant name carried a newline into the slot: every form is matched whole, and the
    refusal shows the character escaped, on one line."""
    assert _one({key: value}) is not None
    with pytest.raises(AnnotationError) as info:
        _one({key: value + control})
    message = str(info.value)
    assert message.isprintable() and message.isascii()
    assert f'{key}="{value}' in message


@pytest.mark.parametrize("key", ["fcsp.sm.0\n", "fcsp.mem.0\n", "fcsp.sm\n"])
def test_a_key_with_a_trailing_newline_is_unknown(key: str) -> None:
    with pytest.raises(AnnotationError, match="is unknown") as info:
        _one({key: "40"})
    assert "\n" not in str(info.value)
