"""The deploy/ files are valid, offline: compose file, Kubernetes manifests, .env.example.

The compose schema is the compose-spec one that check-jsonschema vendors
(``check_jsonschema/builtin_schemas/vendor/compose-spec.json``); the Kubernetes
schemas are those bundled with kubernetes-validate. Neither fetches anything.
"""

import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from replica_router import RouterSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The newest Kubernetes whose schemas kubernetes-validate bundles.
KUBERNETES_VERSION: str = kubernetes_validate.utils.latest_version()
# "NAME=value", or "# NAME=" for a setting whose default is "not set".
ENV_LINE = re.compile(r"^(?:#\s*)?(REPLICA_ROUTER_[A-Z0-9_]+)=(.*)$")


def _compose_schema() -> dict[str, Any]:
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text("utf-8"))
    return schema


def _load_yaml(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def test_compose_file_matches_the_compose_spec() -> None:
    (compose,) = _load_yaml(DEPLOY / "compose.yaml")
    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert errors == []


def test_compose_file_wires_the_services_together() -> None:
    (compose,) = _load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"primary", "replica-1", "replica-2", "app", "prometheus"} <= services.keys()
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    app = services["app"]
    assert app["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / "Dockerfile").is_file()
    environment = app["environment"]
    assert environment["REPLICA_ROUTER_PRIMARY_URL"].endswith("@primary:5432/app")
    replica_urls = environment["REPLICA_ROUTER_REPLICA_URLS"].split(",")
    assert [url.split("@")[1].split(":")[0] for url in replica_urls] == ["replica-1", "replica-2"]
    # Passwords come from secrets, never from text in the compose file.
    assert not any(":" in url.split("@")[0].removeprefix("postgresql://") for url in replica_urls)
    for secret in compose["secrets"].values():
        assert "file" in secret
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source


def test_prometheus_scrapes_the_app() -> None:
    (config,) = _load_yaml(DEPLOY / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["app:8000"]


def test_kubernetes_manifests_exist() -> None:
    names = {path.name for path in MANIFESTS}
    assert {"configmap.yaml", "secret.yaml", "deployment.yaml", "service.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_kubernetes_manifest_is_valid(path: Path) -> None:
    documents = _load_yaml(path)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_deployment_builds_urls_from_the_secret_and_probes_health() -> None:
    (configmap,) = _load_yaml(DEPLOY / "kubernetes" / "configmap.yaml")
    (deployment,) = _load_yaml(DEPLOY / "kubernetes" / "deployment.yaml")
    (secret,) = _load_yaml(DEPLOY / "kubernetes" / "secret.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    names = list(env)
    for variable in ("REPLICA_ROUTER_PRIMARY_URL", "REPLICA_ROUTER_REPLICA_URLS"):
        value = env[variable]["value"]
        assert "$(DB_PASSWORD)" in value
        # $(NAME) expands only from variables defined earlier (or from envFrom).
        for reference in re.findall(r"\$\((\w+)\)", value):
            assert reference in configmap["data"] or names.index(reference) < names.index(variable)
    assert configmap["data"]["DB_PRIMARY_HOST"].endswith("-rw")
    # Readiness fails only when neither reads nor writes can be served; liveness never
    # asks a database: a down primary must neither unready nor restart every pod.
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["resources"]["requests"]
    settings = {f"REPLICA_ROUTER_{name.upper()}" for name in RouterSettings.model_fields}
    unknown = {key for key in configmap["data"] if key.startswith("REPLICA_ROUTER_")} - settings
    assert not unknown


def test_probes_name_the_routers_health_routes() -> None:
    from replica_router import ReplicaRouter

    (deployment,) = _load_yaml(DEPLOY / "kubernetes" / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    routes = ReplicaRouter("postgresql://app:pw@127.0.0.1:1/app").health_routes()
    paths = {getattr(route, "path", None) for route in routes.routes}
    assert {"/health/live", "/health/ready", "/health/nodes", "/health/ui"} <= paths
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in paths


def test_every_cloudnativepg_instance_is_a_replica_node_of_its_own() -> None:
    # Not the -ro Service: one address over several servers would be one node, its
    # probe measuring whichever server its connection landed on.
    (deployment,) = _load_yaml(DEPLOY / "kubernetes" / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value", "") for item in container["env"]}
    urls = env["REPLICA_ROUTER_REPLICA_URLS"].split(",")
    hosts = [url.split("@", 1)[1].split(":", 1)[0] for url in urls]
    services = {
        doc["metadata"]["name"]: doc for doc in _load_yaml(DEPLOY / "kubernetes" / "instances.yaml")
    }
    assert hosts == sorted(services) == ["notes-db-1", "notes-db-2", "notes-db-3"]
    for name, service in services.items():
        assert service["kind"] == "Service"
        assert service["spec"]["selector"] == {
            "cnpg.io/cluster": "notes-db",
            "cnpg.io/instanceName": name,
        }
    for url, host in zip(urls, hosts, strict=True):
        assert url.endswith(f"?replica_name={host}")
        assert not host.endswith("-ro")
    (configmap,) = _load_yaml(DEPLOY / "kubernetes" / "configmap.yaml")
    assert not any(value.endswith("-ro") for value in configmap["data"].values())


def test_the_readme_cloudnativepg_service_is_the_manifests() -> None:
    readme = (DEPLOY.parent / "README.md").read_text(encoding="utf-8")
    _, found, rest = readme.partition("<!-- snippet: cloudnativepg -->\n```yaml\n")
    assert found
    shown = yaml.safe_load(rest.split("\n```\n", 1)[0])
    kubernetes_validate.validate(shown, KUBERNETES_VERSION, strict=True)
    assert shown == _load_yaml(DEPLOY / "kubernetes" / "instances.yaml")[0]


def _env_example() -> dict[str, str]:
    entries: dict[str, str] = {}
    text = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    for line in text.splitlines():
        match = ENV_LINE.match(line.strip())
        if match:
            name, value = match.groups()
            assert name not in entries, f"{name} is listed twice"
            entries[name] = value
    return entries


def test_env_example_lists_exactly_the_settings() -> None:
    expected = [f"REPLICA_ROUTER_{name.upper()}" for name in RouterSettings.model_fields]
    assert sorted(_env_example()) == sorted(expected)


def test_env_example_shows_the_defaults() -> None:
    entries = _env_example()
    for name, field in RouterSettings.model_fields.items():
        value = entries[f"REPLICA_ROUTER_{name.upper()}"]
        if name in {"primary_url", "replica_urls"}:
            continue  # examples, not defaults
        default = field.get_default(call_default_factory=True)
        if default is None:
            assert value == "", f"{name} has no default; leave it unset"
            continue
        parsed = getattr(RouterSettings.defaults(**{name: value}), name)
        assert parsed == default, f"{name}: .env.example says {value!r}, default is {default!r}"
