"""Peak-memory child process:
``python -m compress.evaluate.rss_child DIR BATCH SEQ_LEN THREADS [DEVICE]``.

Prints one JSON line. Kept minimal so the measurement is of loading and running the model. On
a CUDA device the model runs there, and the line also gives the GPU's peak allocated bytes
(``torch.cuda.max_memory_allocated``: the weights plus the forward pass; the CUDA context is
created before the count starts and is not in it).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss_bytes() -> int:
    # On Linux read this process's own high-water mark (VmHWM). ru_maxrss is not usable there:
    # it keeps the high-water mark of the parent's address space copied at fork, so the child
    # would report the (larger) parent's size.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def main(argv: list[str]) -> None:
    variant_dir, batch, seq_len, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    device_name = argv[4] if len(argv) > 4 else "cpu"
    import torch

    from compress.models.adapter import adapter_for
    from compress.variant import BNB_KINDS, MANIFEST, load_variant

    torch.set_num_threads(threads)
    # Libraries the variant needs to run count as runtime, not as the model's memory; only
    # bitsandbytes layers need bitsandbytes (torch's dynamic int8 does not), only Hugging Face
    # models need transformers.
    manifest = json.loads((Path(variant_dir) / MANIFEST).read_text())
    specs = manifest.get("quantized", {})
    if any(spec["kind"] in BNB_KINDS for spec in specs.values()):
        from compress._bnb import import_bnb

        import_bnb()
    if any(spec.get("backend") == "torchao" for spec in specs.values()):
        from compress.compressors.int8_torchao import import_torchao

        import_torchao()
    arch = manifest.get("architecture")
    if isinstance(arch, dict) and arch.get("family") not in (None, "builtin"):
        from compress.models.hf import import_transformers

        import_transformers().AutoModelForCausalLM  # noqa: B018  (its lazy import, done now)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:  # the CUDA context is runtime too: created before "after import"
        torch.cuda.init()
        torch.empty(0, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    after_import = _rss_bytes()
    # Eager even where the variant runs compiled: compiling would add the compiler's own
    # memory (and minutes) to a number that describes the model.
    model = load_variant(variant_dir, compile=False).to(device)
    after_load = _rss_bytes()
    vocab = adapter_for(model).vocab_size(model)
    x = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x.to(device))
    out = {"rss_after_import_bytes": after_import, "rss_after_load_bytes": after_load}
    if cuda:
        torch.cuda.synchronize(device)
        out["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    out["peak_rss_bytes"] = _peak_rss_bytes()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
