"""One short recipe per training verb, each run by `lmforge.train.recipe.run_recipe` over the one Trainer.

    pretrain.py   a decoder from scratch on token shards          (lmforge pretrain)
    finetune.py   full or LoRA fine-tuning of a pretrained model  (lmforge finetune; summarize/translate/multitask)
    classify.py   a head on a decoder's last token                (lmforge classify train)
    seq2seq.py    an encoder-decoder, or the conditional VAE      (lmforge summarize/translate train --model-kind)
    vae.py        the VAE language model on the ELBO              (lmforge vae train)

A new verb is a new module here: a config dataclass for its train defaults (`lmforge.config`), a
`Recipe` whose `build()` returns the model, batches, objective and evaluation, and a typed function
that runs it (the CLI is generated from that function).
"""
