"""Fine-tuning LAVCap with the Trainer: arguments, the Trainer subclass, the released schedule, LoRA, FSDP and Gaudi.

The paper's recipe (configs/config_best.yaml of the release): LoRA r 8 / alpha 32 / dropout 0.1 on the q/v projections
of CED and of the LLM, projector and OT logit scale trained, CLIP and base weights frozen; AdamW (betas 0.9, 0.999),
weight decay 1e-6 on matrices, lr 5e-6 reached by a linear warm-up from 2e-9 over 2 epochs, then a cosine, computed
over the whole run (100 epochs), down to 1e-8 (`schedule.lavcap_lr_scheduler`); batch 4 per device, no gradient
clipping, the last partial batch dropped, captions cut to 300 tokens, SpecAugment (48 mel bins, 192 frames) on
training clips only, one of 8 instructions drawn per example; CED's input BatchNorm statistics updated in training, in
float32; the kept checkpoint is the one with the best teacher-forced token accuracy on the evaluation split;
evaluation captions decoded as the model's `generation_config` says (the released beam search,
`lavcap_hf.model.configuration_lavcap.RELEASED_DECODING`). `examples/configs/lavcap_audiocaps.yaml` writes it out.
"""
