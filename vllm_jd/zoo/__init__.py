"""A trained adapter zoo, built offline on CPU in minutes: a tiny Llama pre-trained from scratch
on synthetic string tasks and one PEFT LoRA per task, with held-out examples (``build.make_zoo``;
``scripts/make_zoo.py``). ``bench/quality.py`` measures compressed stores' task accuracy on it.

Modules: ``tasks`` (task generators), ``data`` (byte tokenizer, batches, greedy decoding),
``train`` (base and LoRA training loops), ``build`` (the zoo folder).
"""
