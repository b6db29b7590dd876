"""Render a deploy/ Kustomize overlay without kustomize: exactly the features deploy/ uses.

    python deploy/render.py deploy/overlays/gpu > gpu.yaml      # same objects as `kubectl kustomize`

tests/test_deploy.py renders every overlay with this (CI has no guaranteed kustomize binary) and, where
kubectl is installed, checks that `kubectl kustomize` gives the same objects. Supported, and nothing
else (any other kustomization field, patch directive or generator option is an error, which keeps the
overlays inside this subset):

* ``resources``: YAML files (several documents each) and folders holding a kustomization.yaml
* ``configMapGenerator``: ``name``, ``files`` (plain file names in the kustomization's folder, each a
  data key), ``options.labels``, and ``options.disableNameSuffixHash: true`` (required: no name hashes)
* ``patches``: ``- path: FILE``, a strategic-merge patch naming its target by apiVersion, kind and
  metadata.name (exactly one object must match)
* ``images``: ``name``, ``newName``, ``newTag``, applied to containers' and initContainers' images

Strategic merge as kustomize does it for the fields used here: maps merge recursively and ``null``
deletes a key; lists of containers, initContainers, volumes and env merge by ``name``, volumeMounts by
``mountPath``, container ports by ``containerPort`` and Service ports by ``port``; an item
``{KEY: ..., $patch: delete}`` removes that item; the merged list holds the patch's items in the
patch's order, then the other items in their order. Every other list is replaced.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images"}
GENERATOR_FIELDS = {"name", "files", "options"}
GENERATOR_OPTIONS = {"labels", "disableNameSuffixHash"}
IMAGE_FIELDS = {"name", "newName", "newTag"}
BY_NAME = ("containers", "initContainers", "volumes", "env")
# the order objects are written in (kustomize's own output order differs; objects are the same)
KIND_ORDER = ("ConfigMap", "PersistentVolumeClaim", "Service", "Deployment", "PodDisruptionBudget",
              "HorizontalPodAutoscaler", "ServiceMonitor")


class RenderError(ValueError):
    pass


def object_id(obj: dict) -> tuple[str, str, str]:
    try:
        return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
    except (KeyError, TypeError):
        raise RenderError(f"object without apiVersion, kind and metadata.name: {obj!r:.200}") from None


def load_documents(path: Path) -> list[dict]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict):
            raise RenderError(f"{path}: a document is not a mapping")
    return docs


def _kustomization_file(folder: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (folder / name).is_file():
            return folder / name
    raise RenderError(f"{folder}: no kustomization.yaml")


def _merge_key(path: tuple[str, ...]) -> str | None:
    """The strategic-merge key of the list at ``path`` (field names from the object's root), or None."""
    field = path[-1]
    if field in BY_NAME:
        return "name"
    if field == "volumeMounts":
        return "mountPath"
    if field == "ports":
        return "containerPort" if len(path) > 1 and path[-2] in ("containers", "initContainers") else "port"
    return None


def merge(base, patch, path: tuple[str, ...] = ()):
    """Strategic merge of ``patch`` into ``base`` (neither is modified)."""
    if isinstance(patch, dict):
        if "$patch" in patch:
            raise RenderError(f"{'.'.join(path)}: only list items may carry $patch (delete)")
        if any(k.startswith("$") for k in patch):
            raise RenderError(f"{'.'.join(path)}: unsupported directive in {sorted(patch)}")
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, path + (key,))
            else:
                out[key] = merge(None, value, path + (key,))
        return out
    if isinstance(patch, list):
        key = _merge_key(path) if path else None
        if key is None or not isinstance(base, list):
            for item in patch:
                if isinstance(item, dict) and "$patch" in item:
                    raise RenderError(f"{'.'.join(path)}: $patch in a list without a merge key")
            return copy.deepcopy(patch)
        return _merge_list(base, patch, key, path)
    return copy.deepcopy(patch)


def _merge_list(base: list, patch: list, key: str, path: tuple[str, ...]) -> list:
    index = {}
    for item in base:
        if not isinstance(item, dict) or key not in item:
            raise RenderError(f"{'.'.join(path)}: item without {key}: {item!r}")
        index[item[key]] = item
    out, seen = [], set()
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise RenderError(f"{'.'.join(path)}: patch item without {key}: {item!r}")
        name = item[key]
        if name in seen:
            raise RenderError(f"{'.'.join(path)}: {key} {name!r} twice in one patch")
        seen.add(name)
        directive = item.get("$patch")
        if directive is not None:
            if directive != "delete" or set(item) != {key, "$patch"}:
                raise RenderError(f"{'.'.join(path)}: only {{{key}: ..., $patch: delete}} is supported")
            if name not in index:
                raise RenderError(f"{'.'.join(path)}: $patch delete of missing {key} {name!r}")
            continue
        out.append(merge(index.get(name), item, path))
    out.extend(copy.deepcopy(item) for item in base if item[key] not in seen)
    return out


def _split_image(image: str) -> tuple[str, str]:
    """(name, the rest: ':tag', '@digest' or '')."""
    for sep in ("@", ":"):
        i = image.rfind(sep)
        if i > image.rfind("/"):
            return image[:i], image[i:]
    return image, ""


def set_images(obj, images: list[dict]) -> None:
    """Rewrite containers' and initContainers' images in place (kustomize's images field)."""
    if isinstance(obj, dict):
        for field, value in obj.items():
            if field in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        name, rest = _split_image(container["image"])
                        for rule in images:
                            if rule["name"] == name:
                                name = rule.get("newName", name)
                                if "newTag" in rule:
                                    rest = f":{rule['newTag']}"
                                container["image"] = name + rest
                                break
            set_images(value, images)
    elif isinstance(obj, list):
        for item in obj:
            set_images(item, images)


def _configmap(folder: Path, spec: dict) -> dict:
    unknown = set(spec) - GENERATOR_FIELDS
    options = spec.get("options", {})
    unknown |= {f"options.{k}" for k in set(options) - GENERATOR_OPTIONS}
    if unknown:
        raise RenderError(f"{folder}: configMapGenerator fields not supported here: {sorted(unknown)}")
    if options.get("disableNameSuffixHash") is not True:
        raise RenderError(f"{folder}: configMapGenerator {spec.get('name')}: set options.disableNameSuffixHash: "
                          "true (name hashes are not implemented here)")
    data = {}
    for name in spec.get("files", []):
        if "=" in name or "/" in name:
            raise RenderError(f"{folder}: configMapGenerator file {name!r}: plain file names only")
        data[name] = (folder / name).read_text()
    metadata = {"name": spec["name"]}
    if options.get("labels"):
        metadata["labels"] = {str(k): str(v) for k, v in options["labels"].items()}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def render(folder: str | Path) -> list[dict]:
    """The objects of the kustomization in ``folder``, patches and images applied."""
    folder = Path(folder)
    kfile = _kustomization_file(folder)
    with open(kfile) as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"{kfile}: fields not supported by deploy/render.py: {sorted(unknown)}")
    objects: list[dict] = []
    for entry in k.get("resources", []):
        target = (folder / entry).resolve()
        objects += render(target) if target.is_dir() else load_documents(target)
    objects += [_configmap(folder, spec) for spec in k.get("configMapGenerator", [])]
    ids = [object_id(o) for o in objects]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise RenderError(f"{kfile}: objects defined twice: {sorted(duplicates)}")
    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            raise RenderError(f"{kfile}: patches: only `- path: FILE` is supported, got {entry!r}")
        for patch in load_documents(folder / entry["path"]):
            pid = object_id(patch)
            matches = [i for i, o in enumerate(objects) if object_id(o) == pid]
            if len(matches) != 1:
                raise RenderError(f"{folder / entry['path']}: patch target {pid} matches {len(matches)} objects")
            objects[matches[0]] = merge(objects[matches[0]], patch)
    images = k.get("images", [])
    for rule in images:
        if set(rule) - IMAGE_FIELDS or "name" not in rule:
            raise RenderError(f"{kfile}: images: only name, newName, newTag are supported, got {rule!r}")
    if images:
        for obj in objects:
            set_images(obj, images)
    return objects


def sorted_objects(objects: list[dict]) -> list[dict]:
    def rank(obj):
        kind = obj["kind"]
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind, obj["metadata"]["name"])
    return sorted(objects, key=rank)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        objects = sorted_objects(render(args[0]))
    except (RenderError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False, width=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
