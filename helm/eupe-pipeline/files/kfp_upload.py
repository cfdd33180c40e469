"""Upload the compiled KFP pipelines (python -m components.kfp_pipeline --out DIR) to a KFP endpoint.

    python kfp_upload.py DIR     # env: KFP_HOST, KFP_NAMESPACE, EUPE_PIPELINE_PREFIX, EUPE_PIPELINE_VERSION

A pipeline KFP does not know yet is uploaded (its first version); a known one gets a new version named
EUPE_PIPELINE_VERSION. A version of that name that exists already (the hook run again for one release) is kept.
"""

import os
import sys
from pathlib import Path

import kfp


def main(folder: str) -> int:
    client = kfp.Client(host=os.environ["KFP_HOST"])  # a token from KF_PIPELINES_SA_TOKEN_PATH when set
    namespace = os.environ.get("KFP_NAMESPACE") or None
    prefix, version = os.environ.get("EUPE_PIPELINE_PREFIX", ""), os.environ["EUPE_PIPELINE_VERSION"]
    packages = sorted(Path(folder).glob("*.yaml"))
    if not packages:
        print(f"kfp upload: no compiled pipeline under {folder}", file=sys.stderr)
        return 2
    for path in packages:
        name = prefix + path.stem
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            client.upload_pipeline(str(path), pipeline_name=name, namespace=namespace,
                                   description=f"EUPE {path.stem}, version {version}")
            print(f"kfp upload: {name}: new pipeline")
            continue
        try:
            client.upload_pipeline_version(str(path), pipeline_version_name=version, pipeline_id=pipeline_id)
        except Exception as e:  # kfp_server_api ApiException; 409 or "already exist" when rerun for a release
            if getattr(e, "status", None) == 409 or "already exist" in str(e).lower():
                print(f"kfp upload: {name}: version {version} exists, kept")
                continue
            raise
        print(f"kfp upload: {name}: version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
