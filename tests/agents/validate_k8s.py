"""Validates the Kubernetes manifests of deploy/k8s against the Kubernetes API schemas
(pip package kubernetes-validate, strict: unknown fields are errors).

    python validate_k8s.py KUBERNETES_VERSION DIR

Reads the resource files DIR/kustomization.yaml lists. KEDA's custom resources
(ScaledObject, TriggerAuthentication) have no schema in the package: they are listed as
skipped, and tests/e2e/deploy.rs checks their fields against the settings. Prints one JSON
line per document and exits 1 if any is invalid.
"""

import json
import os
import sys

import kubernetes_validate
import yaml

CUSTOM = {"keda.sh/v1alpha1"}


def main():
    version, root = sys.argv[1], sys.argv[2]
    with open(os.path.join(root, "kustomization.yaml")) as f:
        files = yaml.safe_load(f)["resources"]
    bad = 0
    for name in files:
        with open(os.path.join(root, name)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            what = {"file": name, "kind": doc.get("kind"),
                    "name": doc.get("metadata", {}).get("name")}
            if doc.get("apiVersion") in CUSTOM:
                print(json.dumps(dict(what, result="skipped: custom resource")))
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                print(json.dumps(dict(what, result="valid")))
            except Exception as e:  # ValidationError, SchemaNotFoundError, ...
                bad += 1
                print(json.dumps(dict(what, result="invalid", error=str(e)[:500])))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
