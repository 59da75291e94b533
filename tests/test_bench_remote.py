"""Bench over SSH against a real OpenSSH server on 127.0.0.1, started by these tests.

The server is Debian's ``sshd`` with its own host key, an authorized key and a PATH (``SetEnv``) that puts
stand-in ``trtexec``, ``tegrastats``, ``nvpmodel`` and ``jetson_clocks`` scripts first (POSIX sh, written by
``bench_support.write_standins``); they accept only the flags the real tools accept, check the ones
rslad-edge relies on, and print the real tools' formats. Tests that go through them say "standin" in their name.
Everything else (ssh, scp, host key checking, the remote script, copying results back, parsing) is the production
path. Skipped, with the reason, where sshd cannot be started.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from bench_support import FIXTURES, tiny_onnx, write_standins, write_tool
from typer.testing import CliRunner

from rslad_edge.bench import RemoteError, SshTarget, bench_artifacts, remote
from rslad_edge.bench.core import TimingConfig
from rslad_edge.bench.remote import describe_onnx, parse_remote_results, remote_script, run_ssh
from rslad_edge.cli import app
from rslad_edge.errors import ConfigError
from rslad_edge.runtime.trt_build import plan_build, trtexec_build_args

SSHD = Path("/usr/sbin/sshd")

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1:<free port> with stand-in Jetson tools first on its PATH."""
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y openssh-client)")
    if not SSHD.is_file():
        pytest.skip("sshd is not installed (apt-get install -y openssh-server)")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        try:  # sshd's privilege-separation directory; systemd creates it where sshd runs as a service
            Path("/run/sshd").mkdir(mode=0o755)
        except OSError as exc:
            pytest.skip(f"cannot create /run/sshd for a root sshd: {exc}")
    root = tmp_path_factory.mktemp("sshd")
    host_key = _keygen(root / "host_key")
    client_key = _keygen(root / "client_key")
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    bin_dir = write_standins(root / "bin")
    port = _free_port()
    config = root / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "StrictModes no", "UsePAM no", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp", f"SetEnv PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin", "",
    ]))
    log = (root / "sshd.log").open("w")
    process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        process.kill()
        process.wait()
        pytest.skip(f"sshd did not start: {(root / 'sshd.log').read_text()[-300:]}")
    known_hosts = root / "known_hosts"
    public_host_key = " ".join((root / "host_key.pub").read_text().split()[:2])
    known_hosts.write_text(f"[127.0.0.1]:{port} {public_host_key}\n")
    yield {"port": port, "root": root, "key": client_key, "known_hosts": known_hosts,
           "user": getpass.getuser(), "bin": bin_dir}
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


def target(sshd, **overrides) -> SshTarget:
    fields = dict(port=sshd["port"], identity=sshd["key"], known_hosts=sshd["known_hosts"], connect_timeout=5)
    fields.update(overrides)
    return SshTarget(f"{sshd['user']}@127.0.0.1", **fields)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("model") / "student.onnx")


def test_ssh_runs_commands_with_host_key_checking(sshd):
    done = run_ssh(target(sshd), "command -v trtexec", timeout=20, action="probing")
    assert done.returncode == 0 and done.stdout.strip() == str(sshd["bin"] / "trtexec")


def test_remote_jetson_bench_end_to_end_with_standin_trtexec_and_tegrastats(sshd, model, tmp_path):
    out = tmp_path / "bench" / "jetson.json"
    report = bench_artifacts([model], device="jetson", target=target(sshd), batches=(1, 8), warmup_seconds=0.05,
                             seconds=0.5, json_path=out)
    rows = report.results
    assert [r.batch for r in rows] == [1, 8]
    for row in rows:
        base = 0.2 + 0.01 * row.batch  # the stand-in's latency model: queries at base + 0..4 us
        assert row.p50_ms == pytest.approx(base + 0.002) and row.iterations == 20
        assert row.backend == "tensorrt" and row.provider == "trtexec (TensorRT 10.3.0) on Orin"
        assert row.host == f"{sshd['user']}@127.0.0.1:{sshd['port']}" and row.precision == "fp32"
        assert row.images_per_s_wall == pytest.approx(20 * row.batch / 0.5)  # trtexec's queries / timed seconds
        assert row.power_rail == "VDD_IN" and row.power_w == pytest.approx(5.0) and row.power_samples >= 2
        assert row.energy_per_image_mj == pytest.approx(5.0 / row.images_per_s_wall * 1e3)
        assert row.gpu_compute_p50_ms == pytest.approx(base + 0.002 - 0.02)
    jetson = report.env["remote"]["jetson"]
    assert jetson["power_mode"]["name"] == "MAXN" and jetson["clocks_locked"] is True
    assert any("not a Jetson" in w for w in report.warnings)  # the test server has no /etc/nv_tegra_release
    saved = json.loads(out.read_text())
    assert len(saved["results"]) == 2 and saved["env"]["remote"]["trt_version"] == "10.3.0"
    raw = Path(saved["env"]["remote"]["raw_outputs"]) / "student_onnx"
    assert (raw / "run.sh").is_file() and (raw / "out" / "trtexec_b8.log").is_file()
    assert not (raw / "out" / "b8.engine").exists()
    leftovers = run_ssh(target(sshd), "ls -d /tmp/rslad-bench.* 2>/dev/null | wc -l", timeout=20, action="listing")
    assert leftovers.stdout.strip() == "0"  # the remote work directory is removed


def test_cli_remote_bench_with_standin_trtexec_prints_power_columns(sshd, model, tmp_path, monkeypatch):
    from rslad_edge.console import console

    monkeypatch.setattr(console, "width", 200)
    result = CliRunner().invoke(app, [
        "bench", str(model), "--device", "jetson", "--host", f"{sshd['user']}@127.0.0.1", "--port",
        str(sshd["port"]), "--identity", str(sshd["key"]), "--known-hosts", str(sshd["known_hosts"]), "--batch", "4",
        "--warmup-seconds", "0.05", "--seconds", "0.3"])
    assert result.exit_code == 0, result.output
    assert "trtexec (TensorRT 10.3.0) on Orin" in result.output and "mJ/img" in result.output
    assert "5.00" in result.output  # watts


def test_host_key_mismatch_is_one_line_saying_so(sshd, tmp_path):
    other = _keygen(tmp_path / "impostor")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd['port']} {' '.join(Path(str(other) + '.pub').read_text().split()[:2])}\n")
    with pytest.raises(RemoteError, match="the host key does not match the one in .*known_hosts.*ssh-keygen -R"):
        run_ssh(target(sshd, known_hosts=wrong), "true", timeout=20, action="probing")


def test_unknown_host_key_is_refused_not_accepted(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(RemoteError, match="no trusted host key for it"):
        run_ssh(target(sshd, known_hosts=empty), "true", timeout=20, action="probing")
    assert empty.read_text() == ""  # StrictHostKeyChecking=yes: nothing was added


def test_unreachable_host_times_out_with_one_line(tmp_path):
    # A socket that accepts TCP connections (kernel backlog) but never speaks SSH: ssh waits for the banner.
    if shutil.which("ssh") is None:
        pytest.skip("ssh is not installed")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"is unreachable: the connection timed out after 1 s") as caught:
            run_ssh(SshTarget("nobody@127.0.0.1", port=port, connect_timeout=1,
                              known_hosts=tmp_path / "known_hosts"), "true", timeout=20, action="probing")
    assert time.monotonic() - start < 10
    assert "\n" not in str(caught.value)


def test_cli_unreachable_host_exits_1_with_one_line(model, tmp_path):
    if shutil.which("ssh") is None:
        pytest.skip("ssh is not installed")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        result = CliRunner().invoke(app, [
            "bench", str(model), "--device", "jetson", "--host", "nobody@127.0.0.1", "--port",
            str(silent.getsockname()[1]), "--connect-timeout", "1", "--known-hosts", str(tmp_path / "kh")])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreachable" in errors[0]


def test_a_failing_build_names_the_first_tensorrt_error_with_standin_trtexec(sshd, model, tmp_path, monkeypatch):
    broken = tmp_path / "bin"
    broken.mkdir()
    # Same server, but the stand-in trtexec is shadowed for this command by one that cannot build.
    write_tool(broken, "trtexec", "#!/bin/sh\ncat " + str(FIXTURES / "trtexec_trt10.3_build_failed.log")
                + "\nexit 1\n")
    config = TimingConfig(batches=(2,), warmup_seconds=0.05, seconds=0.2)
    artifact = describe_onnx(model)
    script = remote_script(artifact, config, "student.onnx").replace(
        "TRTEXEC=$(command -v trtexec", f"PATH={broken}:$PATH; TRTEXEC=$(command -v trtexec")
    monkeypatch.setattr(remote, "remote_script", lambda *args: script)
    with pytest.raises(RemoteError, match=r"the engine build failed \(\[TRT\] ModelImporter.cpp:949.*build_b2.log"):
        remote.bench_remote([model], target(sshd), config=config, workdir=tmp_path / "work")


def test_remote_results_parse_from_a_fixture_folder(tmp_path, model):
    results = tmp_path / "out" / "out"
    results.mkdir(parents=True)
    shutil.copy(FIXTURES / "trtexec_trt10.3_orin_b8.log", results / "trtexec_b8.log")
    shutil.copy(FIXTURES / "exportTimes_trt10.3_orin_b8.json", results / "times_b8.json")
    shutil.copy(FIXTURES / "nvpmodel_q_maxn.txt", results / "nvpmodel.txt")
    shutil.copy(FIXTURES / "nv_tegra_release_r36.3.txt", results / "nv_tegra_release.txt")
    rows, env, warnings = parse_remote_results(tmp_path / "out", describe_onnx(model),
                                               TimingConfig(batches=(8,)), host="jetson")
    row = rows[0]
    assert row.iterations == 12 and row.outliers == 1  # the 2.38 ms query is counted, and kept
    assert row.max_ms == pytest.approx(0.01367 + 2.38281 + 0.03027, abs=1e-5)
    assert row.images_per_s_wall == pytest.approx(3540 * 8 / 3.00084)
    assert row.trtexec_throughput_qps == 1179.67 and row.power_w is None
    assert env["jetson"]["l4t"] == "36.3.0" and any("needs root" in w for w in warnings)


def test_the_remote_script_is_posix_sh_and_finds_trtexec_where_jetpack_puts_it(model):
    script = remote_script(describe_onnx(model), TimingConfig(batches=(1, 64), seconds=2.0), "student.onnx")
    assert script.startswith("#!/bin/sh\n")
    assert "/usr/src/tensorrt/bin/trtexec" in script and "python" not in script
    assert "--maxShapes=input:64x3x32x32" in script and "--exportTimes=out/times_b64.json" in script
    assert "--logfile out/tegrastats_b64.log" in script
    if shutil.which("sh"):
        assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0  # parses


def test_the_remote_script_builds_what_export_plans_and_retries_strongly_typed_only_when_it_differs(model):
    int8 = replace(describe_onnx(model), precision="int8")
    script = remote_script(int8, TimingConfig(batches=(8,)), "student.onnx")
    for major, log in ((10, "build_b8.log"), (11, "build_b8.strongly_typed.log")):
        plan = plan_build(major, "int8", (3, 32, 32), min_batch=8, opt_batch=8, max_batch=8, workspace_gib=None)
        args = trtexec_build_args(plan, "student.onnx", "b8.engine", timing_cache="timing.cache", skip_inference=True)
        assert f'"$TRTEXEC" {shlex.join(args)} > out/{log} 2>&1' in script
    assert "--int8 --fp16" in script  # the TensorRT 10 plan: fp16 for what the Q/DQ graph leaves float
    fp32 = remote_script(describe_onnx(model), TimingConfig(batches=(8,)), "student.onnx")
    assert "--noTF32" in fp32 and "strongly_typed.log" not in fp32  # the same flags on 10 and 11: no retry


def test_ssh_target_validates_host_and_always_checks_host_keys(tmp_path):
    with pytest.raises(Exception, match="--host must look like user@address"):
        SshTarget("-oProxyCommand=evil")
    options = SshTarget("nvidia@jetson", known_hosts=tmp_path / "kh").options()
    assert "StrictHostKeyChecking=yes" in options and "BatchMode=yes" in options
    assert not any("StrictHostKeyChecking=no" in o for o in options)


def test_a_failed_build_is_explained_by_the_first_attempts_log_not_the_retry(tmp_path):
    results = tmp_path / "out"
    results.mkdir()
    shutil.copy(FIXTURES / "trtexec_trt10.3_build_failed.log", results / "build_b64.log")
    (results / "build_b64.strongly_typed.log").write_text(
        "[03/02/2026-10:20:41] [E] Unknown option: --stronglyTyped\n&&&& FAILED TensorRT.trtexec\n")
    detail = remote._failure_detail(results, 21)
    assert "ModelImporter.cpp:949" in detail and "build_b64.log" in detail


def test_a_static_batch_onnx_is_benched_only_at_its_batch(tmp_path):
    static = tiny_onnx(tmp_path / "static.onnx", batch=8)
    assert describe_onnx(static).static_batch == 8
    with pytest.raises(ConfigError, match="static batch of 8: bench it with --batch 8"):
        remote.bench_remote([static], SshTarget("nvidia@192.0.2.1"), config=TimingConfig(batches=(1, 8)),
                            workdir=tmp_path)
