"""Print the runtime requirements from pyproject.toml (torch excluded: installed from its own index).

Usage: python images/base/deps.py [extra,extra...]  -> one requirement per line, for pip -r.
Needs that are not pip extras of the project (smollm2-gguf: installed --no-deps by the Dockerfile) are skipped.
"""

import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [d for d in project["dependencies"] if not d.startswith("torch")]
OWN_STEP = {"smollm2-gguf"}
for extra in filter(None, (sys.argv[1] if len(sys.argv) > 1 else "").split(",")):
    if extra not in OWN_STEP:
        deps += project["optional-dependencies"][extra]
print("\n".join(deps))
