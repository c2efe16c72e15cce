#!/usr/bin/env python3
"""Write src/plan/mergekit/architectures.json: what mergekit 0.1.5 knows about each model
architecture, in mergestream's own compact form.

Reads the architecture definitions shipped with an installed mergekit 0.1.5
(`pip install mergekit==0.1.5`); run with that Python:

    python tools/gen_architectures.py [OUT]

Each entry: the `architectures` names it answers to, its `model_type` (to choose among
several entries for one name), optional `vocab_key` (where config.json keeps the vocabulary
size) and `tagalong` files, and its modules in order. A module: `name`, tensor-name `prefix`,
`layers_key` (the config.json path of its layer count, dotted), `fixed_layers` (a layer count
the definition fixes), and `pre`/`layer`/`post` weights. A weight: `name` (`{}` for the layer
index in layer weights), and when set: `optional`, `aliases` (other names inputs may use),
`tied` (names to read instead when an input lacks it), `vocab` (its vocabulary axis),
`dtype` (a forced output dtype). Templates mergestream cannot express (other placeholders
than the layer index) mark the module `unsupported` with the reason.
"""
import json
import re
import sys
from importlib import resources

import mergekit._data.architectures as defs

PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


def weight(w, problems):
    def conv(s):
        def sub(m):
            if m.group(1) == "layer_index":
                return "{}"
            problems.add("placeholder ${%s}" % m.group(1))
            return m.group(0)
        return PLACEHOLDER.sub(sub, s)

    out = {"name": conv(w["name"])}
    if w.get("optional"):
        out["optional"] = True
    if w.get("aliases"):
        out["aliases"] = [conv(a) for a in w["aliases"]]
    if w.get("tied_names"):
        out["tied"] = [conv(a) for a in w["tied_names"]]
    if w.get("vocabulary_axis") is not None:
        out["vocab"] = w["vocabulary_axis"]
    if w.get("force_dtype"):
        out["dtype"] = w["force_dtype"]
    return out


def module(name, prefix, arch):
    problems = set()
    m = {
        "name": name,
        "prefix": prefix or "",
        "layers_key": arch.get("num_layers_config_key"),
        "fixed_layers": arch.get("override_num_layers"),
        "pre": [weight(w, problems) for w in arch["pre_weights"]],
        "layer": [weight(w, problems) for w in arch["layer_templates"]["weights"]],
        "post": [weight(w, problems) for w in arch["post_weights"]],
    }
    if problems:
        m["unsupported"] = ", ".join(sorted(problems))
    return {k: v for k, v in m.items() if v is not None}


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "src/plan/mergekit/architectures.json"
    entries = []
    for f in sorted(resources.files(defs).iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".json"):
            continue
        d = json.loads(f.read_text())
        e = {"file": f.name, "architectures": d["architectures"], "model_type": d.get("model_type", "")}
        if d.get("kind") == "modular":
            e["modules"] = [
                module(n, md.get("weight_prefix"), md["architecture"])
                for n, md in d["modules"].items()
            ]
            if d.get("vocab_size_config_key"):
                e["vocab_key"] = d["vocab_size_config_key"]
        else:
            e["modules"] = [module("default", "", d)]
        if d.get("tagalong_files"):
            e["tagalong"] = d["tagalong_files"]
        entries.append(e)
    with open(out_path, "w") as fp:
        json.dump({"generated_from": "mergekit 0.1.5", "architectures": entries}, fp, indent=1)
        fp.write("\n")


if __name__ == "__main__":
    main()
