"""fcsp-runtime without an engine: the runc command line, the config.json edit, the choice
of the next runtime, and the real wrapper process handing over to a recording runtime."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fcsp_hook.errors import ConfigError, HookError
from fcsp_hook.hook import hooksd, runtime
from tests.containers import (
    HOOK_CLIENT,
    NATIVE_RUNTIME,
    HookServer,
    HookSetup,
    forget_next_runtime,
)

# ---- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "command", "bundle"),
    [
        (["create", "--bundle", "/b", "--pid-file", "/p", "id"], "create", "/b"),
        (["create", "-b", "/b", "id"], "create", "/b"),
        (["create", "--bundle=/b", "id"], "create", "/b"),
        (["create", "-bundle", "/b", "id"], "create", "/b"),
        (
            ["--root", "/r", "--log", "/l", "--log-format", "json", "create", "-b", "/b", "i"],
            "create",
            "/b",
        ),
        (
            ["--root=/r", "--systemd-cgroup", "--debug", "create", "--bundle", "/b", "i"],
            "create",
            "/b",
        ),
        (["create", "--console-socket", "/s", "--pid-file", "/p", "id"], "create", "."),
        (["create", "--pid-file", "--bundle", "id"], "create", "."),  # a file named --bundle
        (["run", "-d", "--bundle", "/b", "id"], "run", "/b"),
        (["create", "id", "--", "-b", "/x"], "create", "."),
        (["start", "id"], "start", None),
        (["--root", "create", "start", "id"], "start", None),  # "create" is --root's value
        (["delete", "--force", "id"], "delete", None),
        (["features"], "features", None),
        (["--version"], None, None),
        ([], None, None),
    ],
)
def test_command_and_bundle_are_found_like_runc_parses_them(
    args: list[str], command: str | None, bundle: str | None
) -> None:
    """Global flags with values are skipped, both `--flag value` and `--flag=value`, one or
    two dashes; the bundle is --bundle/-b of create/run, else the current directory."""
    assert runtime.split_command(args)[0] == command
    assert runtime.bundle_of(args) == bundle


def test_global_flags_and_container_id() -> None:
    """--log and --log-format are read before the command only; the id is the positional."""
    args = ["--log", "/l.json", "--log-format=json", "create", "--log", "x", "-b", "/b", "cid"]
    assert runtime.global_flag(args, "log") == "/l.json"
    assert runtime.global_flag(args, "log-format") == "json"
    assert runtime.global_flag(["create", "--log", "x"], "log") is None
    assert runtime.container_id_of(args) == "cid"


# ---- the config.json edit -----------------------------------------------------------------


ENTRY = runtime.hook_entry("/opt/fcsp/venv/bin/python3", "/etc/fcsp/config.toml")


def test_hook_entry_is_the_hooksd_entry() -> None:
    """One source for the hook's argv and env: what podman's hooks.d file runs."""
    python = "/opt/fcsp/venv/bin/python3"
    package = hooksd.package_dir(python)
    expected = hooksd.hook_entry(python, Path("/etc/fcsp/config.toml"), package)
    assert expected["hook"] == ENTRY
    assert ENTRY["args"][:2] == ["/opt/fcsp/venv/bin/python3", "-I"]
    assert ENTRY["env"] == list(hooksd.HOOK_ENV)


def test_the_hook_skips_site_when_it_knows_where_its_package_is() -> None:
    """`site` and a venv's .pth files cost tens of ms per start: the hook runs with -S and
    its package's directory on sys.path when that is known, with -m as before when not."""
    fast = hooksd.hook_command("/opt/fcsp/venv/bin/python3", "/opt/fcsp/venv/lib/site")
    assert fast[:4] == ["/opt/fcsp/venv/bin/python3", "-I", "-S", "-c"]
    assert "sys.path.insert(0, '/opt/fcsp/venv/lib/site')" in fast[4]
    assert hooksd.hook_command("/usr/bin/python3", None) == [
        "/usr/bin/python3",
        "-I",
        "-m",
        "fcsp_hook.hook.oci_hook",
    ]
    assert hooksd.package_dir("/nonexistent/python3") is None


def test_doctor_probes_the_entry_the_way_the_hook_imports() -> None:
    """fcspctl doctor runs the hooks.d command with the hook's work replaced by an import:
    a -S entry whose package directory moved (a reinstall without `make install`) fails it."""
    repo = str(Path(__file__).resolve().parents[1])
    good = hooksd.import_probe([*hooksd.hook_command(sys.executable, repo), "oci"])
    assert good[-1].endswith("import fcsp_hook.hook.oci_hook") and "--config" not in good
    assert subprocess.run(good, capture_output=True, check=False).returncode == 0
    moved = hooksd.import_probe([*hooksd.hook_command(sys.executable, "/nonexistent"), "oci"])
    assert subprocess.run(moved, capture_output=True, check=False).returncode != 0
    assert hooksd.import_probe(hooksd.hook_command("/usr/bin/python3", None)) == [
        "/usr/bin/python3",
        "-I",
        "-c",
        "import fcsp_hook.hook.oci_hook",
    ]


def test_hooks_are_added_and_everything_else_is_kept() -> None:
    """createRuntime and poststop get the entry after any existing hooks; other stages,
    unknown fields and the input document itself are untouched."""
    nvidia = {"path": "/usr/bin/nvidia-container-runtime-hook", "args": ["x", "prestart"]}
    other = {"path": "/bin/true"}
    doc = {
        "ociVersion": "1.0.2",
        "hooks": {"prestart": [nvidia], "poststop": [other], "startContainer": [other]},
        "x-vendor": {"keep": [1, 2.5, None]},
    }
    before = json.dumps(doc)
    new = runtime.with_fcsp_hooks(doc, ENTRY)
    assert json.dumps(doc) == before
    assert new["hooks"]["prestart"] == [nvidia]
    assert new["hooks"]["createRuntime"] == [ENTRY]
    assert new["hooks"]["poststop"] == [other, ENTRY]
    assert new["hooks"]["startContainer"] == [other]
    assert new["x-vendor"] == doc["x-vendor"]
    assert list(new) == list(doc)


def test_adding_hooks_twice_changes_nothing() -> None:
    """Idempotent: a spec that already has FCSP's hook (ours, or podman's from hooks.d at
    prestart, or a bare fcsp-hook binary) is returned as is, the same object."""
    once = runtime.with_fcsp_hooks({}, ENTRY)
    assert runtime.with_fcsp_hooks(once, ENTRY) is once
    hooksd_style = {"hooks": {"prestart": [ENTRY], "poststop": [ENTRY]}}
    assert runtime.with_fcsp_hooks(hooksd_style, ENTRY) is hooksd_style
    binary = {"path": "/usr/local/bin/fcsp-hook", "args": ["fcsp-hook", "oci"]}
    bare = {"hooks": {"createRuntime": [binary], "poststop": [binary]}}
    assert runtime.with_fcsp_hooks(bare, ENTRY) is bare


@pytest.mark.parametrize("hooks", [[], {"poststop": {}}])
def test_malformed_hooks_are_refused_not_overwritten(hooks: object) -> None:
    """A hooks field of the wrong shape is an error: replacing it would drop others' hooks."""
    with pytest.raises(HookError, match="refusing to edit it"):
        runtime.with_fcsp_hooks({"hooks": hooks}, ENTRY)


def test_only_fcsp_keys_count_as_asking_for_fcsp() -> None:
    """Annotations decide; 'xfcsp.sm' or an fcsp. value under another key do not."""
    assert runtime.fcsp_annotations({"annotations": {"fcsp.sm": "40", "a": "b"}}) == {
        "fcsp.sm": "40",
        "a": "b",
    }
    assert runtime.fcsp_annotations({"annotations": {"xfcsp.sm": "40", "a": "fcsp.sm"}}) == {}
    assert runtime.fcsp_annotations({"annotations": []}) == {}
    assert runtime.fcsp_annotations([]) == {}


# ---- the next runtime ---------------------------------------------------------------------


def _executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_auto_prefers_nvidia_container_runtime_then_runc(tmp_path: Path) -> None:
    """auto: nvidia-container-runtime anywhere on PATH wins over runc; an absolute setting
    is used as is; with neither on PATH the error says what to do."""
    runc = _executable(tmp_path / "a" / "runc")
    search = f"{tmp_path / 'a'}:{tmp_path / 'b'}"
    assert runtime.resolve_next("auto", search) == str(runc)
    nvidia = _executable(tmp_path / "b" / "nvidia-container-runtime")
    assert runtime.resolve_next("auto", search) == str(nvidia)
    assert runtime.resolve_next("/usr/bin/crun", search) == "/usr/bin/crun"
    with pytest.raises(ConfigError, match="found neither nvidia-container-runtime nor runc"):
        runtime.resolve_next("auto", str(tmp_path / "empty"))


def test_next_setting_reads_only_the_runtime_table(tmp_path: Path) -> None:
    """The fast path reads [runtime] next alone: other sections are not validated there,
    a missing file means auto, and a bad value is the same one-line error as check-config."""
    path = tmp_path / "config.toml"
    assert runtime.next_setting(str(path)) == "auto"
    path.write_text('[observer]\nbogus = 1\n[runtime]\nnext = "/usr/bin/crun"\n')
    assert runtime.next_setting(str(path)) == "/usr/bin/crun"
    path.write_text('[runtime]\nnext = "crun"\n')
    with pytest.raises(ConfigError, match=r"\[runtime\] next = 'crun' is invalid"):
        runtime.next_setting(str(path))


# ---- the wrapper process ------------------------------------------------------------------


@dataclass
class Wrapper:
    """fcsp-runtime run the way an engine runs it, handing over to a recording runtime:
    the Python runtime itself, or the native launcher that runs it for FCSP's creates
    (and whenever it cannot tell the next runtime) and passes everything else through."""

    python: Path
    config: Path
    record: Path
    next_runtime: Path
    log_file: Path
    native: bool = False

    @property
    def client(self) -> str | None:
        """The hook client FCSP's creates get: the installed launcher names one."""
        return str(HOOK_CLIENT) if self.native else None

    def command(self) -> list[str]:
        if not self.native:
            return [str(self.python), "-I", "-m", "fcsp_hook.hook.runtime"]
        return [str(NATIVE_RUNTIME)]

    def environ(self) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], runtime.CONFIG_ENV: str(self.config)}
        if self.native:
            script = self.config.with_name("fcsp-runtime.py")
            if not script.exists():
                script.write_text(
                    f"#!{self.python} -I\nimport sys\n"
                    "from fcsp_hook.hook.runtime import main\n"
                    f"sys.exit(main(hook_client={self.client!r}))\n"
                )
                script.chmod(0o755)
            env["FCSP_RUNTIME_PYTHON"] = str(script)
        return env

    def run(self, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = self.environ()
        return subprocess.run(
            [*self.command(), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=60,
            check=False,
        )

    def recorded(self) -> list[str] | None:
        """The next runtime's argv (argv[0] first), or None if it never ran."""
        argv = self.record / "argv"
        return argv.read_text().split("\0")[:-1] if argv.exists() else None

    def seen_spec(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads((self.record / "config.json").read_text())
        return doc


@pytest.fixture(params=["python", "native"])
def wrapper(tmp_path: Path, hook_python: Path, request: pytest.FixtureRequest) -> Iterator[Wrapper]:
    record = tmp_path / "record"
    record.mkdir()
    # Records its argv and the config.json it was handed (the bundle is in its argv).
    next_runtime = _executable(
        tmp_path / "bin" / "next-runtime",
        "#!/bin/sh\n"
        f'printf \'%s\\0\' "$0" "$@" > {record}/argv\n'
        'b=.; prev=; for a in "$@"; do [ "$prev" = --bundle ] && b=$a; prev=$a; done\n'
        f'[ -f "$b/config.json" ] && cp "$b/config.json" {record}/config.json\n'
        "exit 0\n",
    )
    log_file = tmp_path / "hook.log"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[hook]\nlog_file = "{log_file}"\n[runtime]\nnext = "{next_runtime}"\n'
        f'[paths]\nrun_dir = "{tmp_path / "run"}"\n'
    )
    yield Wrapper(hook_python, config, record, next_runtime, log_file, request.param == "native")
    forget_next_runtime(config)


def _bundle(tmp_path: Path, annotations: dict[str, str], **extra: object) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir(parents=True)
    doc = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/true"], "env": ["NVIDIA_VISIBLE_DEVICES=0"]},
        "root": {"path": "rootfs"},
        "annotations": annotations,
        **extra,
    }
    # Tab-indented, non-ASCII: proves the fast path hands over the bytes as they were.
    (bundle / "config.json").write_text(json.dumps(doc, indent="\t", ensure_ascii=False))
    (bundle / "config.json").chmod(0o600)
    return bundle


CREATE = ["--root", "/run/x", "--log", "{log}", "--log-format", "json", "--systemd-cgroup",
          "create", "--bundle", "{bundle}", "--pid-file", "/run/x/pid",
          "--console-socket", "/run/x/sock", "--no-pivot", "ctr-1"]  # fmt: skip


def _create_args(bundle: Path, log: Path) -> list[str]:
    return [a.format(bundle=bundle, log=log) for a in CREATE]


def test_container_without_fcsp_is_handed_over_untouched(wrapper: Wrapper, tmp_path: Path) -> None:
    """No fcsp.* annotation: the next runtime gets argv unchanged and config.json keeps its
    bytes, inode and mtime (it is neither parsed for hooks nor rewritten)."""
    bundle = _bundle(tmp_path, {"io.podman.x": "fcsp.sm=40", "tenant": "é"})
    spec = bundle / "config.json"
    before, st = spec.read_bytes(), spec.stat()
    args = _create_args(bundle, tmp_path / "runc.log")
    result = wrapper.run(args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert wrapper.recorded() == [str(wrapper.next_runtime), *args]
    assert spec.read_bytes() == before
    assert (spec.stat().st_ino, spec.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not wrapper.log_file.exists()


def test_fcsp_container_gets_the_hooks_then_the_same_argv(wrapper: Wrapper, tmp_path: Path) -> None:
    """fcsp.* annotations: config.json gains the hook at createRuntime and poststop (the
    wrapper's interpreter, -I, the config it was given; behind the native client that asks
    fcsp-hookd first when the launcher names it), keeps every other field and its file
    mode, and the next runtime gets argv unchanged."""
    other = {"path": "/bin/true", "args": ["true"]}
    bundle = _bundle(
        tmp_path, {"fcsp.sm": "40", "fcsp.mem": "8G"}, hooks={"poststop": [other]}, x={"y": 1}
    )
    args = _create_args(bundle, tmp_path / "runc.log")
    result = wrapper.run(args)
    assert result.returncode == 0, result.stderr
    assert wrapper.recorded() == [str(wrapper.next_runtime), *args]
    spec = wrapper.seen_spec()
    assert spec == json.loads((bundle / "config.json").read_text())
    entry = runtime.hook_entry(str(wrapper.python), str(wrapper.config), wrapper.client)
    assert spec["hooks"] == {"poststop": [other, entry], "createRuntime": [entry]}
    assert entry["path"] == (wrapper.client or str(wrapper.python))
    assert spec["x"] == {"y": 1}
    assert spec["annotations"] == {"fcsp.sm": "40", "fcsp.mem": "8G"}
    assert stat.S_IMODE((bundle / "config.json").stat().st_mode) == 0o600
    assert [p.name for p in bundle.iterdir()] == ["config.json"]  # no temporary file left
    events = [json.loads(line)["event"] for line in wrapper.log_file.read_text().splitlines()]
    assert events == ["FCSP hooks added to config.json"]


def test_second_create_of_the_same_bundle_does_not_duplicate(
    wrapper: Wrapper, tmp_path: Path
) -> None:
    """Idempotent: running the wrapper again on its own output leaves the bytes as they are."""
    bundle = _bundle(tmp_path, {"fcsp.sm": "40"})
    args = _create_args(bundle, tmp_path / "runc.log")
    assert wrapper.run(args).returncode == 0
    once = (bundle / "config.json").read_bytes()
    assert wrapper.run(args).returncode == 0
    assert (bundle / "config.json").read_bytes() == once


def test_bundle_defaults_to_the_working_directory(wrapper: Wrapper, tmp_path: Path) -> None:
    """`create ID` without --bundle uses the current directory, as runc does."""
    bundle = _bundle(tmp_path, {"fcsp.sm": "40"})
    result = wrapper.run(["create", "ctr-1"], cwd=bundle)
    assert result.returncode == 0, result.stderr
    assert "createRuntime" in json.loads((bundle / "config.json").read_text())["hooks"]


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"fcsp.sm": "abc"}, 'annotation fcsp.sm="abc" is invalid: expected a percentage'),
        ({"fcsp.smm": "40"}, "annotation fcsp.smm is unknown"),
        ({"fcsp.sm.1": "40"}, "GPU index 1 is out of range"),
    ],
)
def test_bad_annotation_fails_create_with_the_hooks_message(
    wrapper: Wrapper, tmp_path: Path, annotations: dict[str, str], message: str
) -> None:
    """Fail-closed: exit 1, one stderr line with the hook's message, the same line as an
    error record in runc's JSON --log (what containerd shows), config.json untouched, and
    the next runtime never runs."""
    bundle = _bundle(tmp_path, annotations)
    before = (bundle / "config.json").read_bytes()
    runc_log = tmp_path / "runc.log"
    result = wrapper.run(_create_args(bundle, runc_log))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("fcsp-runtime: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    record = json.loads(runc_log.read_text())
    assert record["level"] == "error"
    assert record["msg"] == result.stderr.strip()
    assert (bundle / "config.json").read_bytes() == before
    assert wrapper.recorded() is None


def test_fail_open_starts_the_container_without_fcsp(wrapper: Wrapper, tmp_path: Path) -> None:
    """failure_policy = fail-open: a bad annotation is logged, config.json is left alone and
    the next runtime runs."""
    wrapper.config.write_text(
        wrapper.config.read_text().replace("[hook]\n", '[hook]\nfailure_policy = "fail-open"\n')
    )
    bundle = _bundle(tmp_path, {"fcsp.sm": "abc"})
    before = (bundle / "config.json").read_bytes()
    result = wrapper.run(_create_args(bundle, tmp_path / "runc.log"))
    assert result.returncode == 0, result.stderr
    assert (bundle / "config.json").read_bytes() == before
    assert wrapper.recorded() is not None
    record = json.loads(wrapper.log_file.read_text())
    assert record["level"] == "warning"
    assert record["failure_policy"] == "fail-open"


def test_broken_config_toml_fails_an_fcsp_create_like_the_hook(
    wrapper: Wrapper, tmp_path: Path
) -> None:
    """An FCSP container on a host whose config.toml is invalid does not start (the hook
    fails closed on it too); the message names the file and the key."""
    wrapper.config.write_text(wrapper.config.read_text() + "[hook]\nlibary = '/x'\n")
    bundle = _bundle(tmp_path, {"fcsp.sm": "40"})
    result = wrapper.run(_create_args(bundle, tmp_path / "runc.log"))
    assert result.returncode == 1
    assert str(wrapper.config) in result.stderr
    assert wrapper.recorded() is None


@pytest.mark.parametrize(
    "args",
    [
        ["start", "ctr-1"],
        ["state", "ctr-1"],
        ["kill", "ctr-1", "KILL"],
        ["--root", "/run/x", "delete", "--force", "ctr-1"],
        ["features"],
        ["exec", "--process", "/tmp/p.json", "--detach", "ctr-1"],
        ["--version"],
        ["create", "--bundle", "/nonexistent/bundle", "ctr-1"],
    ],
)
def test_every_other_command_is_passed_through(wrapper: Wrapper, args: list[str]) -> None:
    """Commands other than create/run, and a create whose config.json cannot be read (the
    next runtime reports that itself), reach the next runtime with argv unchanged."""
    result = wrapper.run(args)
    assert result.returncode == 0, result.stderr
    assert wrapper.recorded() == [str(wrapper.next_runtime), *args]


def test_missing_next_runtime_is_one_line(wrapper: Wrapper) -> None:
    """A next runtime that does not exist: exit 127 and one line naming it."""
    wrapper.config.write_text('[runtime]\nnext = "/nonexistent/runc"\n')
    result = wrapper.run(["state", "x"])
    assert result.returncode == 127
    assert result.stderr == (
        "fcsp-runtime: cannot run the next runtime /nonexistent/runc: No such file or directory\n"
    )


def test_next_runtime_pointing_at_the_wrapper_is_refused(wrapper: Wrapper) -> None:
    """[runtime] next naming fcsp-runtime itself would exec forever: refused in one line."""
    itself = NATIVE_RUNTIME if wrapper.native else Path(runtime.__file__)
    wrapper.config.write_text(f'[runtime]\nnext = "{itself}"\n')
    result = wrapper.run(["state", "x"])
    assert result.returncode == 1
    assert "is fcsp-runtime itself" in result.stderr


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "quick"),
    [
        ((REPO / "etc" / "config.toml").read_text(), "auto"),
        ('[runtime]\nnext = "/usr/bin/crun"  # crun here\n', "/usr/bin/crun"),
        ('[hook]\nlog_file = "/var/log/runtime.log"\n[runtime] # ours\n\nnext = "/a"\n', "/a"),
        ('[runtime]\nnext = "/a"\n[paths]\nrun_dir = "/run/fcsp"\n', "/a"),
        ("# [runtime] in a comment only\n[hook]\n", "auto"),
        ('runtime.next = "/usr/bin/crun"\n', None),
        ('runtime = { next = "/usr/bin/crun" }\n', None),
        ("[runtime]\nnext = '/usr/bin/crun'\n", None),
        ('[runtime]\nnext = "/usr/bin/\\u0063run"\n', None),
        ('[runtime.x]\nnext = "/a"\n', None),
        ('[hook]\nx = """\n[runtime]\nnext = "/a"\n"""\n', None),
        ('[runtime]\nnext = "/a"\nother = 1\n', None),
    ],
)
def test_quick_reader_agrees_with_tomllib(text: str, quick: str | None) -> None:
    """The fast path reads [runtime] next from the shipped layout without importing the TOML
    parser (~20 ms on each of the 3-4 runtime calls per container), and gives tomllib's
    answer; any other layout returns None and goes to tomllib: it never guesses."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    assert runtime.quick_next(text) == quick
    if quick is not None:
        assert tomllib.loads(text).get("runtime", {}).get("next", "auto") == quick


_FCSP = b'"annotations": {"fcsp.sm": "40"}'
MALFORMED_SPECS = [
    # (id, config.json, what the one line must say); values are checked where there is a GPU
    (
        "annotation-trailing-newline",
        b'{"process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}, "annotations": {"fcsp.sm": "40\\n"}}',
        'annotation fcsp.sm="40\\n" is invalid: expected a percentage',
    ),
    (
        "annotation-tab",
        b'{"process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}, '
        b'"annotations": {"fcsp.priority": "latency\\t"}}',
        'annotation fcsp.priority="latency\\t" is invalid',
    ),
    (
        "nested-deeply",
        b"{" + _FCSP + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "config.json is JSON nested too deeply to read",
    ),
    (
        "not-utf8",
        b"{" + _FCSP + b', "hostname": "\xff"}',
        "config.json is not UTF-8: byte 0xff at offset 48",
    ),
    ("not-an-object", b"[{" + _FCSP + b"}]", "config.json is not a JSON object"),
    (
        "fcsp-past-16-MiB",
        b'{"process": {"env": ["PAD=' + b"x" * (17 << 20) + b'"]}, ' + _FCSP + b"}",
        "config.json is larger than 16777216 bytes",
    ),
]


@pytest.mark.parametrize(
    ("spec", "message"), [m[1:] for m in MALFORMED_SPECS], ids=[m[0] for m in MALFORMED_SPECS]
)
def test_malformed_spec_that_mentions_fcsp_fails_create_with_one_line(
    wrapper: Wrapper, tmp_path: Path, spec: bytes, message: str
) -> None:
    """A config.json that asks for FCSP, or mentions fcsp. but cannot be read (control
    characters in a value, nested past what json parses, not UTF-8, not an object, fcsp.*
    annotations past the first 16 MiB), fails create with one line naming what is wrong:
    never a traceback, never a container started without the checks; config.json is left
    as it was and the next runtime never runs."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_bytes(spec)
    result = wrapper.run(_create_args(bundle, tmp_path / "runc.log"))
    assert result.returncode == 1, result.stderr[-300:]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("fcsp-runtime: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr
    assert (bundle / "config.json").read_bytes() == spec
    assert wrapper.recorded() is None


@pytest.mark.parametrize("wrapper", ["native"], indirect=True)
def test_the_native_launcher_passes_through_without_python(
    wrapper: Wrapper, tmp_path: Path
) -> None:
    """Once the Python runtime has resolved the next runtime for this config.toml, the
    native launcher execs it itself (Python is not even there any more); a changed
    config.toml, or an FCSP create, goes back to the Python runtime."""
    assert wrapper.run(["state", "x"]).returncode == 0  # the Python runtime records it
    (tmp_path / "fcsp-runtime.py").write_text("#!/nonexistent\n")
    result = wrapper.run(["state", "y"])
    assert result.returncode == 0, result.stderr
    assert wrapper.recorded() == [str(wrapper.next_runtime), "state", "y"]
    bundle = _bundle(tmp_path, {"fcsp.sm": "40"})
    created = wrapper.run(_create_args(bundle, tmp_path / "runc.log"))
    assert created.returncode != 0 and "fcsp-runtime.py" in created.stderr
    config = wrapper.config.read_text()
    wrapper.config.write_text(config + "\n")
    changed = wrapper.run(["state", "z"])
    assert changed.returncode != 0 and "fcsp-runtime.py" in changed.stderr


@pytest.mark.parametrize("wrapper", ["native"], indirect=True)
def test_the_native_launcher_hands_fcsp_creates_to_fcsp_hookd(
    wrapper: Wrapper, tmp_path: Path
) -> None:
    """After one FCSP create by the Python runtime, the record names fcsp-hookd and the
    hook client; FCSP's creates then go to fcsp-hookd (the Python runtime, now broken, is
    never run), a relative bundle included, and its refusal is the runtime's one line, on
    stderr and in --log.  With fcsp-hookd gone, the Python runtime runs again."""
    log = tmp_path / "runc.log"
    first = wrapper.run(_create_args(_bundle(tmp_path / "a", {"fcsp.sm": "40"}), log))
    assert first.returncode == 0, first.stderr
    record = Path(runtime.next_record(str(wrapper.config))).read_text().splitlines()
    socket_path = tmp_path / "run" / hooksd.HOOKD_SOCKET
    assert record[-2:] == [f"hookd {socket_path}", f"client {HOOK_CLIENT}"]

    python_runtime = tmp_path / "fcsp-runtime.py"
    working = python_runtime.read_text()
    python_runtime.write_text("#!/bin/sh\necho the Python runtime ran >&2\nexit 99\n")
    setup = HookSetup(tmp_path, tmp_path / "run", wrapper.log_file, wrapper.config)
    hookd = HookServer(setup).start(wrapper.python)
    try:
        bundle = _bundle(tmp_path / "b", {"fcsp.sm": "40"})
        args = _create_args(Path("bundle"), log)
        served = wrapper.run(args, cwd=bundle.parent)
        assert served.returncode == 0, served.stderr
        assert wrapper.recorded() == [str(wrapper.next_runtime), *args]
        entry = runtime.hook_entry(str(wrapper.python), str(wrapper.config), wrapper.client)
        assert wrapper.seen_spec()["hooks"] == {"createRuntime": [entry], "poststop": [entry]}

        bad = _bundle(tmp_path / "c", {"fcsp.sm": "150"})
        refused = wrapper.run(_create_args(bad, log))
        assert refused.returncode == 1
        line = 'fcsp-runtime: annotation fcsp.sm="150" is invalid'
        assert refused.stderr.count(line) == 1 and refused.stderr.count("\n") == 1
        assert json.loads(log.read_text().splitlines()[-1])["msg"].startswith(line)
    finally:
        hookd.stop()
    down = wrapper.run(_create_args(_bundle(tmp_path / "d", {"fcsp.sm": "40"}), log))
    assert down.returncode == 99 and "the Python runtime ran" in down.stderr
    python_runtime.write_text(working)
    again = wrapper.run(_create_args(_bundle(tmp_path / "e", {"fcsp.sm": "40"}), log))
    assert again.returncode == 0, again.stderr


def test_a_malformed_runtime_create_request_is_refused(capfd: pytest.CaptureFixture[str]) -> None:
    """fcsp-hookd's side takes the launcher's request in its one form only."""
    assert runtime.served_create(["--config", "/c.toml", "create"]) == runtime.EXIT_FAILED
    assert capfd.readouterr().err == "fcsp-runtime: fcsp-hookd: malformed runtime-create request\n"


def test_an_error_with_a_read_only_stderr_still_reaches_the_log(
    wrapper: Wrapper, tmp_path: Path
) -> None:
    """containerd's shim gives a sandbox's create /dev/null opened read-only as stderr:
    the reason still reaches the --log file, and the exit status is the runtime's own."""
    wrapper.config.write_text('[runtime]\nnext = "relative/runc"\n')
    log = tmp_path / "runc.log"
    with open("/dev/null", "rb") as read_only:
        result = subprocess.run(
            [*wrapper.command(), "--log", str(log), "state", "x"],
            env=wrapper.environ(),
            stderr=read_only,
            check=False,
        )
    assert result.returncode == 1
    assert "[runtime] next = 'relative/runc' is invalid" in log.read_text()
