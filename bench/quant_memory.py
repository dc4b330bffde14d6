"""Resident weight bytes of the full-size DiffusionGemma, quantized as it is built, on this machine's CPU.

    python bench/quant_memory.py                      # NF4, 30 layers: the figure against the 16 GB target
    python bench/quant_memory.py --layers 2           # a quick look; the 30-layer total is extrapolated

The model is constructed on the meta device and each layer is drawn at random in bf16, quantized and
kept packed before the next one exists (`workers/layerwise.py`), so the bf16 model (50.8 GB) never
exists. Resident bytes count every distinct tensor the model holds, quantization states included;
the peak is the process's maximum resident set, which includes one bf16 layer in flight.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import torch
from full_size import full_size_config

from blockpress.workers.layerwise import build_layerwise, random_source
from blockpress.workers.quantize import weight_bytes

TARGET_BYTES = 16e9


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _breakdown(model: Any) -> dict[str, int]:
    decoder = model.model.decoder
    experts = sum(weight_bytes(layer.experts) for layer in decoder.layers)
    layers = sum(weight_bytes(layer) for layer in decoder.layers)
    encoder_own = sum(weight_bytes(layer) for layer in model.model.encoder.language_model.layers) - layers
    vision = weight_bytes(model.model.encoder.vision_tower) + weight_bytes(model.model.encoder.embed_vision)
    embedding = weight_bytes(decoder.embed_tokens)
    total = weight_bytes(model)
    return {
        "experts": experts,
        "dense_layers": layers - experts + encoder_own,
        "embedding_and_head": embedding,
        "self_conditioning": weight_bytes(decoder.self_conditioning),
        "vision": vision,
        "rest": total - layers - encoder_own - embedding - vision - weight_bytes(decoder.self_conditioning),
        "total": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", choices=["nf4", "fp8"], default="nf4")
    parser.add_argument("--layers", type=int, default=30, help="layers to build (the total is extrapolated to 30)")
    args = parser.parse_args()

    started = time.perf_counter()
    marks: list[dict[str, float]] = []

    def on_layer(index: int, model: Any) -> None:
        marks.append({"layer": index, "s": time.perf_counter() - started, "rss_gb": _rss() / 1e9})
        print(f"layer {index + 1}/{args.layers}: {marks[-1]['s']:.0f} s, RSS {marks[-1]['rss_gb']:.2f} GB", flush=True)

    torch.manual_seed(0)
    model = build_layerwise(
        full_size_config(args.layers),
        random_source(dtype=torch.bfloat16),
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        quantization=args.quantization,
        on_layer=on_layer,
    )
    parts = _breakdown(model)
    per_layer = (parts["experts"] + parts["dense_layers"]) / args.layers
    total_30 = parts["total"] + per_layer * (30 - args.layers)
    report = {
        "quantization": args.quantization,
        "layers_built": args.layers,
        "resident_weight_bytes": parts,
        "resident_weight_gb_30_layers": round(total_30 / 1e9, 3),
        "resident_weight_gib_30_layers": round(total_30 / 2**30, 3),
        "target_gb": TARGET_BYTES / 1e9,
        "meets_target": total_30 <= TARGET_BYTES,
        "peak_rss_gb": round(_peak_rss() / 1e9, 3),
        "final_rss_gb": round(_rss() / 1e9, 3),
        "build_s": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
