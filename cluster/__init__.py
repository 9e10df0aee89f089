"""Data only: this kustomize tree ships inside the flowops wheel as `flowops.resources.cluster`
(pyproject.toml maps it), read through `flowops.resources.cluster_tree()`."""
