"""Tasks: each module exposes `build(config) -> jaxckpt.runner.task.Task`.

- `experiments.tasks.digits`: UCI handwritten digits (shipped in scikit-learn, works offline).
- `experiments.tasks.imdb`: IMDB movie-review sentiment through tfds `imdb_reviews`.
- `experiments.tasks.lm`: a byte-level transformer language model over the Python standard
  library's own sources (`lm_data`; works offline).
- `experiments.tasks.hf_vision`: the digits with a Hugging Face ViT built from an HF config (offline).
- `experiments.tasks.hf_text`: IMDB with a BERT-family encoder from an `hf:` folder and a fresh head.

Shared pieces: `data` (tfds data sources + grain pipelines), `models` (Flax modules whose top-level
parameters are `encoder`, `fusion`, `head`), `classifier` (loss, metrics, predictions),
`tokenizer` (the IMDB word vocabulary), and the tfds builders `digits_builder` and `imdb_builder`
(both prepare ARRAY_RECORD files without TensorFlow).

Hugging Face models: `hf_models` (`load` an HF folder as a Flax module and params, `build` one from
a `config.json`) and `hf_modules` (the Flax BERT, ViT and GPT-2 modules).
"""
