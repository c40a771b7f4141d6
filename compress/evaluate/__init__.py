"""Measurements: perplexity, latency and memory, as defined in :data:`DEFINITIONS`."""

from __future__ import annotations

# Written into every report, so a reader knows exactly what each number is.
DEFINITIONS: dict[str, str] = {
    "perplexity": (
        "exp of the token-weighted mean negative log-likelihood (natural log) of the held-out "
        "split's tokens, as the Hugging Face guide 'Perplexity of fixed-length models' defines "
        "it: windows of at most seq_len tokens start every stride tokens, and each window scores "
        "only the tokens after the previous window's end, each from the tokens before it in the "
        "window (with stride = seq_len the first token of each window is not scored). Every "
        "variant of a run is scored on exactly the same tokens."
    ),
    "unigram perplexity": (
        "perplexity of a unigram model (token frequencies of the training split, add-one "
        "smoothed over the vocabulary) on the same held-out tokens: the floor any language model "
        "should beat by a wide margin."
    ),
    "latency_ms_median / latency_ms_iqr": (
        "median and interquartile range (75th minus 25th percentile) of the wall time of one "
        "forward pass over a batch of token ids, at the stated batch size, sequence length and "
        "torch thread count, after warm-up passes (on CUDA, timed to completion). Each variant is "
        "timed together with the baseline in alternating rounds (one pass each per round), and "
        "latency_ms_median_ratio is the variant's median over the baseline's median of that same "
        "measurement; the baseline's row pools its timings from every such measurement."
    ),
    "weight_bytes": (
        "exact bytes of every tensor in the model's state dict as stored, shared (tied) tensors "
        "once: quantized codes plus their scales, absmax values and quantization maps; biases, "
        "norms and embeddings in their own dtype."
    ),
    "quantized_layer_bytes (ratio)": (
        "bytes of the layers a quantization stage converted, after conversion, and that number "
        "divided by the same layers' bytes before conversion (fp32)."
    ),
    "bits_per_weight": (
        "bits per weight of the quantized layers' weight matrices including their scales and "
        "maps (biases excluded); 32 for an unquantized model."
    ),
    "saved_bytes": "size on disk of the saved variant: model.safetensors plus its JSON manifest.",
    "peak_rss_bytes": (
        "peak resident set size (VmHWM; ru_maxrss where there is no /proc) of a fresh Python "
        "process that imports torch and compress, loads the saved variant and runs one forward "
        "pass at the latency batch shape. rss_after_import_bytes is that process's resident "
        "size after importing the libraries the variant needs (torch; bitsandbytes for "
        "quantized variants) and before loading it, so peak minus it (model_rss_bytes) is what "
        "the model and its inference added."
    ),
    "params": (
        "parameters the model represents, tied weights once, packed 4-bit weights at their "
        "logical (unpacked) count."
    ),
    "sparsity": (
        "fraction of exactly-zero entries in the weight matrices of the linear layers (float "
        "weights or int8 codes; embeddings, the tied LM head and packed 4-bit codes excluded)."
    ),
    "ratios (*_ratio)": "the metric divided by the baseline's value of the same run.",
}
