"""Shape registry shared by the benchmarks (one place, so docs and runs agree)."""

# The headline sketch shape, and SmolLM2-135M's q_proj / v_proj / MLP shapes at 2x512 tokens.
SKETCH_SHAPES = {
    "N4096-d2048": dict(n=4096, d_in=2048, d_out=2048, k_in=16, k_out=16),
    "smollm2-q_proj": dict(n=1024, d_in=576, d_out=576, k_in=16, k_out=16),
    "smollm2-v_proj": dict(n=1024, d_in=576, d_out=192, k_in=16, k_out=16),
    "smollm2-down_proj": dict(n=1024, d_in=1536, d_out=576, k_in=16, k_out=16),
}

# 210 layers (SmolLM2's 30 blocks x 7 projections), window 32, 256-entry sketches.
SPECTRA_SHAPE = dict(layers=210, window=32, k=256)

# Training-step overhead: SmolLM2-135M's architecture (random weights) and a tiny smoke version.
TRAIN_STEP_MODELS = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, batch=2, seq=128,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, batch=2, seq=32,
    ),
}
