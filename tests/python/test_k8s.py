"""The Kubernetes deployment in ``deploy/k8s/``, checked offline against the real binaries.

* Every manifest that ``kustomization.yaml`` lists passes ``kubernetes-validate`` (strict
  mode: unknown fields are errors) against the newest Kubernetes the pinned package ships
  schemas for; the kustomization lists exactly the YAML files of the folder; the image is
  one kustomize ``images:`` entry that every container uses.
* The job manifest held by the ConfigMap passes ``scfm validate``, and the objects agree
  with it: Service and container ports with ``cluster.coordinator`` and
  ``metrics.prometheus``, worker parallelism with ``cluster.max_workers``, the grace
  periods with ``cluster.preempt_grace_s``, the Secret's token key with ``auth.token_env``
  (and with the variable ``scfm-worker join`` and ``scfm status`` read).
* The container command lines are the ones the local integration tests run
  (``scfm launch MANIFEST``, ``scfm-worker join --coordinator http://HOST:PORT --bind IP``),
  with flags that the binaries' ``--help`` lists.
* Live: ``scfm launch`` runs on the ConfigMap's manifest (storage, data, ports and model
  made local and small); the readiness probe's port accepts connections, the liveness
  probe's path answers 200, the init container's wait command and the README's
  ``scfm status`` answer, and a worker started with the Job's exact command as PID 1 of its
  own PID namespace (as in a container) checkpoints and exits 0 when the Job's preStop
  hook runs; the coordinator then ends the job as preempted.
* ``deploy/k8s/README.md`` shows only kubectl commands on these objects and files.

Binaries: ``$SCFM_BIN`` (else beside ``$SCFM_WORKER_BIN``, else ``<repo>/target/release/scfm``)
and ``$SCFM_WORKER_BIN`` (else ``<repo>/target/release/scfm-worker``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
#: The Kubernetes version the manifests are validated against: the newest that the pinned
#: kubernetes-validate (scripts/requirements.txt) ships schemas for.
K8S_VERSION = "1.37.0"
#: Where the ConfigMap is mounted in the coordinator and the key holding the manifest.
MANIFEST_KEY = "job.yaml"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _binary(env: str, name: str) -> Path:
    if os.environ.get(env):
        p = Path(os.environ[env])
    elif name == "scfm" and os.environ.get("SCFM_WORKER_BIN"):
        p = Path(os.environ["SCFM_WORKER_BIN"]).with_name("scfm")
    else:
        p = REPO / "target" / "release" / name
    if not p.is_file() or not os.access(p, os.X_OK):
        pytest.fail(
            f"{name} binary not found or not executable at {p}; build it with "
            f"`cargo build --release` or set {env}",
            pytrace=False,
        )
    return p


@pytest.fixture(scope="module")
def scfm() -> Path:
    return _binary("SCFM_BIN", "scfm")


@pytest.fixture(scope="module")
def scfm_worker() -> Path:
    return _binary("SCFM_WORKER_BIN", "scfm-worker")


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["RUST_BACKTRACE"] = "0"
    env.update(extra)
    return env


def _run(cmd: list, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def kustomization(folder: Path = K8S) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def load_objects(folder: Path = K8S) -> list[tuple[str, dict]]:
    """Every object of every file the kustomization lists, as (file, object)."""
    out = []
    for name in kustomization(folder)["resources"]:
        for doc in yaml.safe_load_all((folder / name).read_text()):
            if doc is not None:
                out.append((name, doc))
    return out


def find(objects: list[tuple[str, dict]], kind: str, name: str | None = None) -> dict:
    hits = [o for _, o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def validation_errors(folder: Path = K8S) -> list[str]:
    """kubernetes-validate (strict) on every object the kustomization lists."""
    errors = []
    for name, doc in load_objects(folder):
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {doc.get('kind')}/{doc['metadata'].get('name')}: {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{name}: {e.message}")
    return errors


def kustomization_problems(folder: Path = K8S) -> list[str]:
    """The kustomization's resources against the folder's YAML files."""
    listed = kustomization(folder).get("resources", [])
    present = {p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    problems = [f"{f} is listed but missing" for f in listed if not (folder / f).is_file()]
    problems += [f"{f} is in the folder but not listed" for f in sorted(present - set(listed))]
    problems += [f"{f} is listed twice" for f in set(listed) if listed.count(f) > 1]
    return problems


def job_manifest(objects) -> tuple[dict, str]:
    """The ConfigMap mounted by the coordinator, and its job manifest (text)."""
    deploy = find(objects, "Deployment", "scfm-coordinator")
    volumes = deploy["spec"]["template"]["spec"]["volumes"]
    cms = [v["configMap"]["name"] for v in volumes if "configMap" in v]
    assert len(cms) == 1, f"the coordinator mounts one ConfigMap, found {cms}"
    cm = find(objects, "ConfigMap", cms[0])
    return cm, cm["data"][MANIFEST_KEY]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict, name: str) -> dict:
    hits = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    assert len(hits) == 1, f"{obj['metadata']['name']}: one container named {name}"
    return hits[0]


def port_of(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def container_port(c: dict, port) -> int:
    """A probe's or Service's target port (a number or a container port's name)."""
    if isinstance(port, int):
        return port
    hits = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert len(hits) == 1, f"container {c['name']} has no port named {port}"
    return hits[0]


def help_flags(binary: Path, *sub: str) -> str:
    p = _run([binary, *sub, "--help"], env=_env())
    assert p.returncode == 0, p.stderr
    return p.stdout


def env_of_flag(help_text: str, flag: str) -> str | None:
    for line in help_text.splitlines():
        if line.strip().startswith(flag) or f" {flag} " in line:
            m = re.search(r"\[env: ([A-Z0-9_]+)=?[^\]]*\]", line)
            if m:
                return m.group(1)
    return None


def consistency_problems(objects) -> list[str]:
    """What must agree between the job manifest and the Kubernetes objects."""
    problems = []
    _, text = job_manifest(objects)
    m = yaml.safe_load(text)
    cl = m["cluster"]
    grpc, metrics = port_of(cl["coordinator"]), port_of(m["metrics"]["prometheus"])
    deploy = find(objects, "Deployment", "scfm-coordinator")
    coord = container(deploy, "coordinator")
    svc = find(objects, "Service", "scfm-coordinator")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    if ports.get("grpc", {}).get("port") != grpc:
        problems.append(f"Service grpc port {ports.get('grpc')} != cluster.coordinator port {grpc}")
    if ports.get("metrics", {}).get("port") != metrics:
        problems.append(f"Service metrics port {ports.get('metrics')} != metrics.prometheus port {metrics}")
    for name, want in (("grpc", grpc), ("metrics", metrics)):
        if name in ports and container_port(coord, ports[name].get("targetPort", ports[name]["port"])) != want:
            problems.append(f"Service {name} targets a container port other than {want}")
    sel = svc["spec"]["selector"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in sel.items()):
        problems.append(f"Service selector {sel} does not select the coordinator pods {labels}")
    ann = deploy["spec"]["template"]["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(metrics):
        problems.append(f"prometheus.io annotations {ann} do not scrape port {metrics}")
    ready, live = coord.get("readinessProbe", {}), coord.get("livenessProbe", {})
    if container_port(coord, ready.get("tcpSocket", {}).get("port", -1)) != grpc:
        problems.append(f"readiness probe {ready} is not a tcpSocket on {grpc}")
    if live.get("httpGet", {}).get("path") != "/metrics" or container_port(coord, live["httpGet"].get("port", -1)) != metrics:
        problems.append(f"liveness probe {live} is not GET /metrics on {metrics}")
    job = find(objects, "Job", "scfm-worker")
    js = job["spec"]
    if not (js.get("completionMode") == "Indexed" and js.get("parallelism") == js.get("completions") == cl["max_workers"]):
        problems.append(
            f"worker Job: completionMode {js.get('completionMode')}, parallelism {js.get('parallelism')}, "
            f"completions {js.get('completions')}; want Indexed, {cl['max_workers']} (cluster.max_workers)"
        )
    grace = cl.get("preempt_grace_s", 120)
    for obj in (deploy, job):
        g = pod_spec(obj).get("terminationGracePeriodSeconds", 30)
        if g < grace:
            problems.append(f"{obj['metadata']['name']}: terminationGracePeriodSeconds {g} < preempt_grace_s {grace}")
    worker = container(job, "worker")
    res = worker.get("resources", {})
    for part in ("requests", "limits"):
        if str(res.get(part, {}).get("nvidia.com/gpu")) != "1":
            problems.append(f"worker {part} nvidia.com/gpu is {res.get(part, {}).get('nvidia.com/gpu')}, not 1")
    if "preStop" not in worker.get("lifecycle", {}):
        problems.append("worker has no preStop hook")
    cache = m["data"].get("cache_dir")
    if cache and cache not in [v["mountPath"] for v in worker.get("volumeMounts", [])]:
        problems.append(f"data.cache_dir {cache} is not a volume of the worker")
    return problems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# Static checks
# --------------------------------------------------------------------------------------


def test_validator_version_and_offline_schemas():
    """The pinned package ships the schemas (no network) of K8S_VERSION, its newest."""
    assert tuple(int(x) for x in K8S_VERSION.split(".")[:2]) >= (1, 30)
    assert kubernetes_validate.latest_version() == K8S_VERSION, (
        f"kubernetes-validate {kubernetes_validate.version.__version__} ships schemas up to "
        f"{kubernetes_validate.latest_version()}; update K8S_VERSION"
    )
    req = (REPO / "scripts" / "requirements.txt").read_text()
    pin = re.search(r"^kubernetes-validate==(\S+)$", req, re.M)
    assert pin and pin.group(1) == kubernetes_validate.version.__version__


def test_kustomization_lists_every_yaml_file(tmp_path):
    assert kustomization_problems() == []
    assert kustomization()["kind"] == "Kustomization"
    # The check sees a file left out, and a listed file that is missing.
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    (copy_dir / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (copy_dir / "service.yaml").unlink()
    assert kustomization_problems(copy_dir) == [
        "service.yaml is listed but missing",
        "extra.yaml is in the folder but not listed",
    ]


@pytest.mark.parametrize("name", kustomization()["resources"])
def test_manifest_validates_against_kubernetes_schema(name):
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert docs, f"{name} holds no object"
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.37"


def test_validator_rejects_broken_manifests(tmp_path):
    """A misspelt field (strict mode), a wrong type and a missing required field fail."""
    assert validation_errors() == []
    job = yaml.safe_load((K8S / "workers.yaml").read_text())
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["parallelism"] = "four"
    no_image = copy.deepcopy(job)
    del no_image["spec"]["template"]["spec"]["containers"][0]["name"]
    for bad in (typo, wrong_type, no_image):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    # And through the folder check, on a mutated copy.
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    (copy_dir / "workers.yaml").write_text(yaml.safe_dump(typo))
    errors = validation_errors(copy_dir)
    assert len(errors) == 1 and "terminationGracePeriod" in errors[0], errors


def test_single_image_entry_used_by_every_container():
    images = kustomization()["images"]
    assert len(images) == 1 and images[0]["name"] and images[0].get("newTag"), images
    name = images[0]["name"]
    for file, obj in load_objects():
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(obj)
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["image"].split(":")[0] == name, f"{file}: {c['name']} uses {c['image']}, not {name}"
    if shutil.which("kubectl"):  # render as `kubectl apply -k` would, where kubectl is installed
        p = _run(["kubectl", "kustomize", K8S])
        assert p.returncode == 0, p.stderr
        rendered = [d for d in yaml.safe_load_all(p.stdout) if d]
        assert len(rendered) == len(load_objects())
        want = f"{images[0].get('newName', name)}:{images[0]['newTag']}"
        for obj in rendered:
            if obj["kind"] in ("Deployment", "Job"):
                spec = pod_spec(obj)
                assert {c["image"] for c in spec.get("initContainers", []) + spec["containers"]} == {want}


def test_configmap_manifest_passes_scfm_validate(scfm, tmp_path):
    cm, text = job_manifest(load_objects())
    m = yaml.safe_load(text)
    assert m["cluster"]["coordinator"] == "0.0.0.0:7000"
    assert m["metrics"]["prometheus"] == "0.0.0.0:9464"
    assert m["auth"]["token_env"] == "SCFM_TOKEN"
    assert re.match(r"^(s3|gs|az)://", m["data"]["path"]) and re.match(r"^(s3|gs|az)://", m["checkpoint"]["url"])
    path = tmp_path / MANIFEST_KEY
    path.write_text(text)
    env = _env(**{m["auth"]["token_env"]: "test-token"})
    p = _run([scfm, "validate", path], env=env)
    assert p.returncode == 0, p.stderr
    resolved = yaml.safe_load(p.stdout)
    assert resolved["cluster"]["coordinator"] == m["cluster"]["coordinator"]
    assert resolved["checkpoint"]["url"] == m["checkpoint"]["url"]
    assert resolved["cluster"]["max_workers"] == m["cluster"]["max_workers"]
    # The binary does reject a broken manifest (an unknown key).
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  preempt_grace_s:", "  preempt_grace:"))
    p = _run([scfm, "validate", bad], env=env)
    assert p.returncode != 0 and "preempt_grace" in p.stderr, p.stderr


def test_objects_agree_with_the_job_manifest():
    objects = load_objects()
    assert consistency_problems(objects) == []
    # The check sees disagreements.
    broken = copy.deepcopy(objects)
    job = find(broken, "Job", "scfm-worker")
    job["spec"]["parallelism"] += 1
    pod_spec(job)["terminationGracePeriodSeconds"] = 10
    find(broken, "Service", "scfm-coordinator")["spec"]["ports"][0]["port"] += 1
    problems = consistency_problems(broken)
    assert any("parallelism" in p for p in problems), problems
    assert any("terminationGracePeriodSeconds 10" in p for p in problems), problems
    assert any("Service grpc port" in p for p in problems), problems


def test_command_lines_match_the_binaries(scfm, scfm_worker):
    objects = load_objects()
    _, text = job_manifest(objects)
    m = yaml.safe_load(text)
    deploy = find(objects, "Deployment", "scfm-coordinator")
    coord = container(deploy, "coordinator")
    cm_volume = next(v["name"] for v in pod_spec(deploy)["volumes"] if "configMap" in v)
    mount = next(v["mountPath"] for v in coord["volumeMounts"] if v["name"] == cm_volume)
    # Coordinator: `scfm launch MANIFEST`, MANIFEST = the ConfigMap's key where it is mounted.
    assert coord["command"] == ["scfm", "launch", f"{mount}/{MANIFEST_KEY}"]
    assert "args" not in coord
    launch = help_flags(scfm, "launch")
    assert "Usage: scfm launch [OPTIONS] <MANIFEST>" in launch
    # Worker: `scfm-worker join --coordinator http://SERVICE:PORT --bind $(POD_IP)`.
    svc = find(objects, "Service", "scfm-coordinator")
    grpc = port_of(m["cluster"]["coordinator"])
    worker = container(find(objects, "Job", "scfm-worker"), "worker")
    assert worker["command"] == [
        "scfm-worker",
        "join",
        "--coordinator",
        f"http://{svc['metadata']['name']}:{grpc}",
        "--bind",
        "$(POD_IP)",
    ]
    assert "args" not in worker
    pod_ip = [e for e in worker["env"] if e["name"] == "POD_IP"]
    assert pod_ip == [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    join = help_flags(scfm_worker, "join")
    assert "Usage: scfm-worker join [OPTIONS] --coordinator <COORDINATOR>" in join
    for flag in ("--coordinator <COORDINATOR>", "--bind <BIND>", "--token <TOKEN>"):
        assert flag in join, f"`scfm-worker join --help` lists no {flag}"


def test_token_and_storage_secret():
    objects = load_objects()
    _, text = job_manifest(objects)
    token_env = yaml.safe_load(text)["auth"]["token_env"]
    secret = find(objects, "Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert token_env in keys
    # Placeholders only: the template never carries a real credential.
    for k, v in secret.get("stringData", {}).items():
        assert v == "REPLACE_ME", f"{k} is not a placeholder"
    # Every key is a variable the code reads: the token, or a storage variable named by
    # common/src/storage.rs (which configures object_store from the environment).
    storage_src = (REPO / "common" / "src" / "storage.rs").read_text()
    for k in keys - {token_env}:
        assert re.search(rf"\b{k}\b", storage_src), f"{k} is not read by common/src/storage.rs"
    # Every container gets the Secret (coordinator: auth.token_env and storage; workers and
    # the init container: SCFM_TOKEN and storage).
    for kind, name in (("Deployment", "scfm-coordinator"), ("Job", "scfm-worker")):
        spec = pod_spec(find(objects, kind, name))
        for c in spec.get("initContainers", []) + spec["containers"]:
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert refs == [secret["metadata"]["name"]], f"{name}/{c['name']} does not load the Secret"


def test_token_variable_is_the_one_the_binaries_read(scfm, scfm_worker):
    _, text = job_manifest(load_objects())
    token_env = yaml.safe_load(text)["auth"]["token_env"]
    assert env_of_flag(help_flags(scfm_worker, "join"), "--token") == token_env
    assert env_of_flag(help_flags(scfm, "status"), "--token") == token_env


def test_readme_commands_are_kubectl_on_these_objects():
    """deploy/k8s/README.md shows only kubectl commands on the listed files and objects
    (plus `scfm status`, run through kubectl exec, which the live test runs)."""
    text = (K8S / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    assert blocks, "README.md shows no commands"
    objects = load_objects()
    names = {(o["kind"].lower(), o["metadata"]["name"]) for _, o in objects}
    files = set(kustomization()["resources"]) | {"kustomization.yaml"}
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    assert commands
    for cmd in commands:
        words = shlex.split(cmd)
        assert words[0] == "kubectl", f"README command is not kubectl: {cmd}"
        for flag in ("-k", "-f"):
            if words[1] in ("apply", "delete", "create", "diff") and flag in words:
                target = words[words.index(flag) + 1]
                assert target == "deploy/k8s" or (target.startswith("deploy/k8s/") and Path(target).name in files), cmd
        for w in words:
            m = re.match(r"^(deployment|job|service|configmap|secret|pod)/([a-z0-9-]+)$", w)
            if m:
                assert (m.group(1), m.group(2)) in names, f"{cmd}: no {w} in the manifests"
        if "--" in words:
            inner = words[words.index("--") + 1 :]
            assert inner[:2] == ["scfm", "status"] and len(inner) == 3, f"{cmd}: only `scfm status TARGET` runs in a pod"
            assert inner[2] == "127.0.0.1:7000", cmd


# --------------------------------------------------------------------------------------
# Live: the real coordinator and worker with the manifests' commands, probes and hooks
# --------------------------------------------------------------------------------------


def _local_manifest(text: str, tmp: Path, grpc: int, metrics: int) -> dict:
    """The ConfigMap's manifest with storage, data, ports, model and threads made local and
    small (one CPU worker); every other key as deployed."""
    m = yaml.safe_load(text)
    data = REPO / "data" / "mouse10k.h5ad"
    if not data.is_file():
        pytest.fail(f"{data} is missing: run scripts/setup.sh", pytrace=False)
    m["data"].update(path=str(data), cache_dir=str(tmp / "cache"), loader_threads=1)
    m["model"] = {"preset": "minimal"}
    m["training"].update(threads=1, batch_size=16, eval_every=100000, max_steps=100000)
    m["training"].pop("early_stopping_patience", None)
    m["cluster"].update(min_workers=1, max_workers=1, device="cpu", coordinator=f"127.0.0.1:{grpc}")
    m["checkpoint"].update(url=str(tmp / "run"), every_steps=100000)
    m["metrics"]["prometheus"] = f"127.0.0.1:{metrics}"
    return m


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_live_coordinator_probes_and_worker_prestop(scfm, scfm_worker, tmp_path):
    objects = load_objects()
    _, text = job_manifest(objects)
    deployed = yaml.safe_load(text)
    token_env = deployed["auth"]["token_env"]
    grace = deployed["cluster"]["preempt_grace_s"]
    deploy = find(objects, "Deployment", "scfm-coordinator")
    coord = container(deploy, "coordinator")
    job = find(objects, "Job", "scfm-worker")
    worker = container(job, "worker")
    service = find(objects, "Service", "scfm-coordinator")["metadata"]["name"]
    grpc_k8s = port_of(deployed["cluster"]["coordinator"])

    grpc, metrics = _free_port(), _free_port()
    m = _local_manifest(text, tmp_path, grpc, metrics)
    manifest = tmp_path / MANIFEST_KEY
    manifest.write_text(yaml.safe_dump(m))
    assert _run([scfm, "validate", manifest], env=_env(**{token_env: "t"})).returncode == 0
    # The image has both binaries on PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scfm").symlink_to(scfm)
    (bindir / "scfm-worker").symlink_to(scfm_worker)
    env = _env(**{token_env: "k8s-test-token", "PATH": f"{bindir}:{os.environ['PATH']}"})

    def to_local(word: str) -> str:
        return word.replace(f"{service}:{grpc_k8s}", f"127.0.0.1:{grpc}")

    c_proc = w_proc = None
    c_log, w_log = tmp_path / "coordinator.log", tmp_path / "worker.log"
    try:
        # The coordinator's command, with the mounted manifest replaced by the local one.
        cmd = [str(manifest) if w.endswith(f"/{MANIFEST_KEY}") else w for w in coord["command"]]
        c_proc = subprocess.Popen(cmd, env=env, stdout=c_log.open("w"), stderr=subprocess.STDOUT)
        # Readiness (and startup) probe: a TCP connection to the gRPC port.
        deadline = time.time() + 60
        while True:
            assert c_proc.poll() is None, c_log.read_text()
            try:
                socket.create_connection(("127.0.0.1", grpc), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "the coordinator never listened\n" + c_log.read_text()
                time.sleep(0.2)
        # Liveness probe: GET path on the metrics port answers 200.
        path = coord["livenessProbe"]["httpGet"]["path"]
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(f"http://127.0.0.1:{metrics}{path}", timeout=5) as r:
            assert r.status == 200
        # The worker's init container returns once the coordinator answers with the token.
        init = pod_spec(job)["initContainers"][0]["command"]
        p = _run([to_local(w) for w in init], env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        # The README's `scfm status 127.0.0.1:7000` (run in the coordinator pod).
        p = _run(["scfm", "status", f"127.0.0.1:{grpc}"], env=env)
        assert p.returncode == 0 and "joining" in p.stdout, p.stdout + p.stderr

        # The worker, as PID 1 of its own PID namespace like a container's command.
        probe = _run(["unshare", "--pid", "--fork", "--mount-proc", "true"])
        if probe.returncode != 0:
            pytest.skip(f"cannot make a PID namespace here (unshare: {probe.stderr.strip()})")
        values = {"POD_IP": "127.0.0.1"}  # kubelet expands $(POD_IP) from the downward API
        wcmd = [re.sub(r"\$\((\w+)\)", lambda g: values[g.group(1)], to_local(w)) for w in worker["command"]]
        assert wcmd[:2] == ["scfm-worker", "join"]
        w_proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--", *wcmd],
            env=env,
            stdout=w_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        step = 0
        while step < 2:
            assert w_proc.poll() is None, w_log.read_text()
            assert time.time() < deadline, "no training steps\n" + w_log.read_text()[-3000:]
            time.sleep(0.5)
            p = _run(["scfm", "status", f"127.0.0.1:{grpc}", "--json"], env=env)
            if p.returncode == 0:
                step = json.loads(p.stdout)["step"]
        kids = _children(w_proc.pid)
        assert len(kids) == 1, kids
        # The preStop hook, run inside the worker's namespace (where the worker is PID 1).
        hook = worker["lifecycle"]["preStop"]["exec"]["command"]
        t0 = time.time()
        hooked = subprocess.run(["nsenter", "--target", str(kids[0]), "--pid", "--mount", "--", *hook], timeout=grace + 30)
        # The hook was still waiting when the worker exited (the kernel ended it with the
        # namespace), so it spans the whole stop.
        assert hooked.returncode == -signal.SIGKILL, f"preStop hook ended with {hooked.returncode}"
        assert time.time() - t0 < pod_spec(job)["terminationGracePeriodSeconds"]
        assert w_proc.wait(timeout=10) == 0, w_log.read_text()[-3000:]
        assert c_proc.wait(timeout=grace) == 0, c_log.read_text()[-3000:]
        log = c_log.read_text()
        assert re.search(r"worker joined .* pid=1\b", log), log[-3000:]
        assert re.search(r"preempted at step \d+: checkpoint saved", log), log[-3000:]
        assert "preempted: checkpoint saved, stopping" in w_log.read_text(), w_log.read_text()[-3000:]
        latest = json.loads((tmp_path / "run" / "latest.json").read_text())
        assert latest["step"] >= 2 and (tmp_path / "run" / latest["dir"]).is_dir(), latest
    finally:
        _stop(w_proc)
        if c_proc is not None and c_proc.poll() is None:
            c_proc.send_signal(signal.SIGTERM)
            try:
                c_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        _stop(c_proc)
