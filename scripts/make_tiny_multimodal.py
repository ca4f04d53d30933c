#!/usr/bin/env python3
"""Build tiny random-weight Gemma 3 multimodal + SigLIP checkpoints and reference outputs.

Run through scripts/make-tiny-multimodal.sh (which pins every package). Writes:

  tests/fixtures/tiny-medgemma/      Gemma3ForConditionalGeneration (architecture of
                                     google/medgemma-4b-it), random weights, Hub key names
  tests/fixtures/tiny-medsiglip/     SiglipModel (architecture of google/medsiglip-448),
                                     random weights, Hub key names
  tests/fixtures/image-preprocessing.json
                                     PIL/HF image-processor and pydicom reference values for
                                     the real images in shared/fixtures/images/

Nothing is downloaded: every config, tokenizer and model is built here from scratch with
fixed seeds, on CPU, float32, eager attention, one thread. Running it twice gives
byte-identical files.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import PIL
import pydicom
import safetensors
import tokenizers
import transformers
from PIL import Image
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "fixtures" / "images"

# --------------------------------------------------------------------------- helpers


def f32(x):
    """A float32 value as the shortest decimal that round-trips to the same float32."""
    return float(str(np.float32(x)))


def tolist32(a):
    """Nested lists of shortest-round-trip float32 decimals (full float32 precision)."""
    a = np.asarray(a, dtype=np.float32)
    flat = iter([float(str(v)) for v in a.ravel()])

    def build(shape):
        if not shape:
            return next(flat)
        return [build(shape[1:]) for _ in range(shape[0])]

    return build(a.shape)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compact_json(obj) + "\n", encoding="utf-8")


def compact_json(obj, indent=0):
    """JSON with one key per line for objects, but lists of scalars on a single line."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [
            f'{pad} {json.dumps(k, ensure_ascii=False)}: {compact_json(v, indent + 1)}' for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        if all(isinstance(v, list) and all(not isinstance(w, (dict, list)) for w in v) for v in obj):
            rows = [pad + " " + json.dumps(v, allow_nan=False, separators=(",", ":")) for v in obj]
            return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
        return "[\n" + ",\n".join(pad + " " + compact_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


PIXEL_FORMULA = (
    "pixel_values[k][c][y][x] = (float32)( (double)((c*131 + y*31 + x*17 + k*71) % 255) / 127.5 - 1.0 ), "
    "shape per image (3, S, S), c,y,x,k 0-based integers; the division and subtraction are done in "
    "float64 and the result rounded once to float32 (Rust: (((c*131+y*31+x*17+k*71)%255) as f64 / 127.5 - 1.0) as f32)"
)


def synthetic_pixels(k, size):
    c = np.arange(3, dtype=np.int64)[:, None, None]
    y = np.arange(size, dtype=np.int64)[None, :, None]
    x = np.arange(size, dtype=np.int64)[None, None, :]
    m = (c * 131 + y * 31 + x * 17 + k * 71) % 255
    return (m.astype(np.float64) / 127.5 - 1.0).astype(np.float32)


# --------------------------------------------------------------------------- corpus

CORPUS = """\
The patient is a 67 year old man with a history of hypertension, type 2 diabetes and chronic kidney disease.
He presented to the emergency department with shortness of breath, orthopnea and bilateral leg swelling.
Chest radiograph shows cardiomegaly with pulmonary vascular congestion and small bilateral pleural effusions.
There is no focal consolidation and no pneumothorax. The heart size is enlarged. The mediastinum is normal.
Frontal and lateral views of the chest were obtained. The lungs are clear. No acute cardiopulmonary process.
Findings are consistent with congestive heart failure. Recommend clinical correlation and follow up imaging.
The fundus photograph shows a normal optic disc, normal macula and normal retinal vessels without hemorrhage.
Diabetic retinopathy is not seen. There are no microaneurysms, exudates or cotton wool spots in either eye.
The skin lesion is an irregular pigmented macule with asymmetric borders and variable color on the left arm.
Dermoscopy suggests a melanocytic lesion; excision biopsy is recommended to exclude melanoma.
Medications: metformin 500 mg twice daily, lisinopril 10 mg daily, furosemide 40 mg daily, aspirin 81 mg.
Allergies: penicillin causes rash. Blood pressure 150/90 mmHg, heart rate 98, oxygen saturation 91% on room air.
Laboratory results show elevated creatinine, low sodium, high potassium and an elevated brain natriuretic peptide.
Hemoglobin A1c was 8.2 percent three months ago. The white blood cell count is normal. Troponin is negative.
Assessment: acute decompensated heart failure. Plan: diuresis, daily weights, fluid restriction, echocardiogram.
Describe this chest radiograph. What is the heart size? Is there a pleural effusion? Is the lung clear?
Describe this image. What are the findings? Summarize the report for the patient in plain language.
The computed tomography scan of the abdomen shows no free air, no abscess and a normal appendix.
Magnetic resonance imaging of the brain shows no acute infarct, no hemorrhage and no mass effect.
The ultrasound of the right upper quadrant demonstrates gallstones without wall thickening or fluid.
A previous study from last year is available for comparison. The findings are stable since the prior exam.
Impression: mild cardiomegaly. Small right pleural effusion. Atelectasis at the left lung base.
Hello. Hello, how can I help you today? Thank you. Please describe the image and answer the question.
The model answers questions about medical images, radiology reports and clinical notes for doctors.
Normal chest x-ray. Chest x-ray with cardiomegaly. Fundus photograph. Skin lesion. Histopathology slide.
The nurse recorded vital signs every four hours. The doctor reviewed the medication list and the problem list.
Encounter for routine follow up of chronic conditions. Discharge summary. Progress note. Radiology report.
Right lower lobe pneumonia with air bronchograms. Left upper lobe nodule measuring 8 mm, recommend CT follow up.
Endotracheal tube tip is 4 cm above the carina. Central venous catheter tip projects over the superior vena cava.
Osteopenia of the thoracic spine. Degenerative changes of the shoulders. No acute fracture is identified.
"""

GEMMA_SPECIALS = [
    "<pad>",  # 0
    "<eos>",  # 1
    "<bos>",  # 2
    "<unk>",  # 3
    "<start_of_turn>",  # 4
    "<end_of_turn>",  # 5
    "<start_of_image>",  # 6
    "<end_of_image>",  # 7
    "<image_soft_token>",  # 8
]
GEMMA_NEWLINES = ["\n", "\n\n"]  # 9, 10: ordinary (non-special) added tokens
GEMMA_BPE_SIZE = 1024 - 256  # trained part incl. specials/newlines; + 256 byte-fallback tokens


def corpus_lines():
    return [line for line in CORPUS.split("\n") if line.strip()]


def build_gemma_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=GEMMA_BPE_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in GEMMA_SPECIALS + GEMMA_NEWLINES],
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    # Append the 256 byte-fallback tokens <0x00>..<0xFF> (as Gemma's vocabulary has them) and make
    # "\n" / "\n\n" ordinary added tokens (Gemma: not special, never skipped when decoding).
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    next_id = len(vocab)
    for b in range(256):
        name = f"<0x{b:02X}>"
        assert name not in vocab
        vocab[name] = next_id
        next_id += 1
    for entry in data["added_tokens"]:
        if entry["content"] in GEMMA_NEWLINES:
            entry["special"] = False
    data["post_processor"] = None
    data["normalizer"] = None
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, t in enumerate(GEMMA_SPECIALS + GEMMA_NEWLINES):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


SIGLIP_SPECIALS = ["<pad>", "</s>", "<unk>"]  # 0, 1, 2 (as SigLIP's T5-style sentencepiece)
SIGLIP_MAX_LEN = 64


def build_siglip_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SIGLIP_SPECIALS],
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    tok.enable_truncation(max_length=SIGLIP_MAX_LEN)
    tok.enable_padding(direction="right", pad_id=eos, pad_token="</s>", length=SIGLIP_MAX_LEN)
    for i, t in enumerate(SIGLIP_SPECIALS):
        assert tok.token_to_id(t) == i
    return tok


# --------------------------------------------------------------------------- random init

# Gemma's token embedding is multiplied by sqrt(hidden)=8 at run time and tied to lm_head; a small std
# keeps the residual stream from being dominated by the current token (which would make greedy decoding
# just repeat the last input token).
GEMMA_EMBED_STD = float(os.environ.get("TINY_GEMMA_EMBED_STD", "0.05"))
# ... and the final norm gets a larger gain (x * (1 + w), w ~ N(2, 0.5)) so the logits still vary by O(1).


def reinit_(model, seed, special=None):
    """Re-initialise every parameter with a seeded normal that keeps activations O(1).

    Gemma RMSNorm (x * (1 + w)): w ~ N(0, 0.3). LayerNorm: w ~ 1 + N(0, 0.2), b ~ N(0, 0.2).
    Linear / projection matrices: N(0, (1.6 / sqrt(fan_in))^2). Biases: N(0, 0.1).
    Embeddings: N(0, GEMMA_EMBED_STD) (Gemma token, scaled by sqrt(hidden) at run time), N(0, 0.5) otherwise.
    """
    g = torch.Generator().manual_seed(seed)
    owners = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), (f"{mname}.{pname}" if mname else pname, mod, pname, p))
    report = []
    for full, mod, pname, p in sorted(owners.values(), key=lambda t: t[0]):
        cls = type(mod).__name__
        shape = tuple(p.shape)

        def normal(std, mean=0.0):
            return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

        if special and full in special:
            val = special[full](shape)
            rule = "explicit"
        elif "RMSNorm" in cls:
            val, rule = normal(0.3), "rmsnorm N(0,0.3)"
        elif isinstance(mod, torch.nn.LayerNorm):
            if pname == "weight":
                val, rule = normal(0.2, 1.0), "layernorm 1+N(0,0.2)"
            else:
                val, rule = normal(0.2), "layernorm bias N(0,0.2)"
        elif isinstance(mod, torch.nn.Embedding):
            std = GEMMA_EMBED_STD if "embed_tokens" in full else 0.5
            val, rule = normal(std), f"embedding N(0,{std})"
        elif pname.endswith("bias") or len(shape) == 1:
            val, rule = normal(0.1), "bias N(0,0.1)"
        elif isinstance(mod, torch.nn.Conv2d):
            fan_in = shape[1] * shape[2] * shape[3]
            val, rule = normal(1.0 / math.sqrt(fan_in)), "conv N(0,1/sqrt(fan_in))"
        elif full.endswith("mm_input_projection_weight"):
            fan_in = shape[0]  # used as x @ W, W: [vision_hidden, text_hidden]
            val, rule = normal(1.6 / math.sqrt(fan_in)), "proj N(0,1.6/sqrt(fan_in))"
        elif full.endswith("probe"):
            val, rule = normal(1.0), "probe N(0,1)"
        else:
            fan_in = shape[-1]
            val, rule = normal(1.6 / math.sqrt(fan_in)), "matrix N(0,1.6/sqrt(fan_in))"
        with torch.no_grad():
            p.copy_(val)
        report.append((full, shape, rule))
    return report


# --------------------------------------------------------------------------- tiny MedGemma


def text_config_dict(vocab_size):
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        sliding_window_pattern=4,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        attention_bias=False,
        attention_dropout=0.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def vision_config_dict(image_size, use_head):
    return dict(
        image_size=image_size,
        patch_size=14,
        num_channels=3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        attention_dropout=0.0,
        vision_use_head=use_head,
    )


MEDGEMMA_PROMPT_ONE = (
    "<start_of_turn>user\nDescribe this chest radiograph: <start_of_image> What is the heart size?"
    "<end_of_turn>\n<start_of_turn>model\n"
)
MEDGEMMA_PROMPT_TWO = (
    "<start_of_turn>user\nCompare the prior study <start_of_image> with the current study <start_of_image>"
    " Is the pleural effusion stable?<end_of_turn>\n<start_of_turn>model\n"
)
MEDGEMMA_PROMPT_TEXT = "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"


def expand_prompt(prompt):
    full = "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"
    return prompt.replace("<start_of_image>", full)


def make_medgemma(out_dir, tmp):
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_gemma_tokenizer()
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = ((tok_vocab + 7) // 8) * 8
    ids = {t: tok.token_to_id(t) for t in GEMMA_SPECIALS + GEMMA_NEWLINES}

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok_dir = tmp / "gemma-tok"
    hf_tok.save_pretrained(tok_dir)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        if (tok_dir / name).exists():
            shutil.copyfile(tok_dir / name, out_dir / name)
    # The saved tokenizer.json must be the same tokenizer (no post-processor adding BOS).
    reloaded = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    assert reloaded.post_processor is None
    assert reloaded.encode("Hello").ids == tok.encode("Hello").ids

    image_processor = Gemma3ImageProcessor(
        do_resize=True,
        size={"height": 896, "width": 896},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    image_processor.save_pretrained(out_dir)

    config = Gemma3Config(
        text_config=text_config_dict(vocab_size),
        vision_config=vision_config_dict(896, False),
        mm_tokens_per_image=256,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    model.tie_weights()
    gemma_special = {
        "model.language_model.norm.weight": lambda shape: torch.randn(
            shape, generator=torch.Generator().manual_seed(7)) * 0.5 + 2.0,
    }
    init_report = reinit_(model, seed=20250101, special=gemma_special)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.eval()
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    model.save_pretrained(out_dir, safe_serialization=True)

    # Key names: must be the Hub (legacy) layout.
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F32"}, dtypes
    assert "lm_head.weight" not in keys
    for k in keys:
        assert k.startswith(("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")), k
    for required in [
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.embeddings.position_embedding.weight",
        "vision_tower.vision_model.post_layernorm.weight",
        "multi_modal_projector.mm_input_projection_weight",
        "multi_modal_projector.mm_soft_emb_norm.weight",
    ]:
        assert required in keys, required

    # Reload from disk and check that it is the same model (names map back).
    reloaded_model = Gemma3ForConditionalGeneration.from_pretrained(
        out_dir, attn_implementation="eager", torch_dtype=torch.float32
    ).eval()
    sd1, sd2 = model.state_dict(), reloaded_model.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    del reloaded_model

    # ---------------------------------------------------------------- inputs
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=hf_tok, image_seq_length=256)
    bos = ids["<bos>"]
    image_id = ids["<image_soft_token>"]

    def encode_case(prompt, n_images):
        expanded = expand_prompt(prompt)
        input_ids = [bos] + tok.encode(expanded, add_special_tokens=True).ids
        assert input_ids.count(image_id) == 256 * n_images
        # cross-check with the real Gemma3Processor (dummy PIL images: only the text path matters)
        if n_images:
            dummy = [Image.new("RGB", (32, 32), (i * 40, 80, 120)) for i in range(n_images)]
            p = processor(text="<bos>" + prompt, images=[dummy], return_tensors="np")
            assert p["input_ids"][0].tolist() == input_ids, "Gemma3Processor disagrees with manual expansion"
            assert p["token_type_ids"][0].tolist() == [1 if t == image_id else 0 for t in input_ids]
        else:
            p = hf_tok("<bos>" + prompt)
            assert p["input_ids"] == input_ids
        token_type_ids = [1 if t == image_id else 0 for t in input_ids]
        return input_ids, token_type_ids

    def vision_summary(pix):
        with torch.no_grad():
            h = model.model.vision_tower(pixel_values=pix[:1]).last_hidden_state[0]
        h64 = h.double()
        return {
            "shape": list(h.shape),
            "first_rows": tolist32(h[:8].numpy()),
            "sum": float(h64.sum()),
            "sum_of_squares": float((h64 * h64).sum()),
        }

    def forward_logits(input_ids, token_type_ids, pix):
        ii = torch.tensor([input_ids])
        kw = dict(input_ids=ii, attention_mask=torch.ones_like(ii))
        if pix is not None:
            kw["pixel_values"] = pix
        if token_type_ids is not None:
            kw["token_type_ids"] = torch.tensor([token_type_ids])
        with torch.no_grad():
            return model(**kw).logits[0]

    reference = {
        "description": (
            "Reference outputs of transformers' Gemma3ForConditionalGeneration (eager attention, float32, CPU, "
            "eval, no_grad) for the random-weight checkpoint in this folder. Inputs: input_ids (bos prepended "
            "explicitly, image placeholders expanded as Gemma3Processor does), pixel_values from pixel_formula, "
            "token_type_ids (1 at <image_soft_token>), attention_mask all ones."
        ),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "tolerance_note": (
            "Computed in float32 on CPU with one thread. A correct float32 candle implementation should match "
            "logits / features to about 1e-4 absolute (use ~1e-3 absolute plus 1e-3 relative as the test "
            "tolerance; vision sums over 131072 values: compare with relative 1e-4). Greedy ids: compare only "
            "steps whose top-2 margin is above ~1e-3."
        ),
        "pixel_formula": PIXEL_FORMULA.replace("S, S", "896, 896"),
        "image_size": 896,
        "special_token_ids": ids,
        "vocab_size_tokenizer": tok_vocab,
        "vocab_size_config": vocab_size,
        "image_expansion": "each <start_of_image> in the prompt is replaced by "
        "'\\n\\n<start_of_image>' + 256 x '<image_soft_token>' + '<end_of_image>\\n\\n', then the text is "
        "tokenized (no special tokens added by the tokenizer) and <bos> (id 2) is prepended",
        "cases": {},
    }

    with torch.no_grad():
        for case_name, prompt, n_images in [
            ("one_image", MEDGEMMA_PROMPT_ONE, 1),
            ("two_images", MEDGEMMA_PROMPT_TWO, 2),
        ]:
            input_ids, token_type_ids = encode_case(prompt, n_images)
            pix = torch.from_numpy(np.stack([synthetic_pixels(k, 896) for k in range(n_images)]))
            image_features = model.model.get_image_features(pix)
            assert tuple(image_features.shape) == (n_images, 256, 64)
            logits = forward_logits(input_ids, token_type_ids, pix)
            # The bidirectional image mask must be in effect: without token_type_ids (pure causal +
            # sliding window) the logits after the image must differ.
            logits_causal = forward_logits(input_ids, [0] * len(input_ids), pix)
            after = [i for i, t in enumerate(input_ids) if t == ids["<end_of_image>"]][-1] + 1
            diff_after = float((logits[after:] - logits_causal[after:]).abs().max())
            before_first = input_ids.index(ids["<start_of_image>"])
            diff_before = float((logits[: before_first + 1] - logits_causal[: before_first + 1]).abs().max())
            print(f"[medgemma:{case_name}] len={len(input_ids)} max|logits(bidir)-logits(causal)| "
                  f"after image={diff_after:.4g}, before image={diff_before:.3g}")
            assert diff_after > 1e-2, "bidirectional image attention is not applied"
            assert diff_before == 0.0
            if n_images == 2:
                # tokens of image 1 must not see image 2: changing image 2 leaves image-1 span unchanged
                pix_alt = pix.clone()
                pix_alt[1] = torch.from_numpy(synthetic_pixels(5, 896))
                logits_alt = forward_logits(input_ids, token_type_ids, pix_alt)
                second_boi = [i for i, t in enumerate(input_ids) if t == ids["<start_of_image>"]][1]
                d_first = float((logits[:second_boi + 1] - logits_alt[:second_boi + 1]).abs().max())
                d_second = float((logits[second_boi + 1:] - logits_alt[second_boi + 1:]).abs().max())
                print(f"[medgemma:{case_name}] change image 2 -> max diff before its span={d_first:.3g}, "
                      f"after={d_second:.4g}")
                assert d_first == 0.0 and d_second > 1e-2
            positions = [i for i, t in enumerate(input_ids) if t != image_id]
            case = {
                "prompt": prompt,
                "n_images": n_images,
                "input_ids": input_ids,
                "token_type_ids": token_type_ids,
                "seq_len": len(input_ids),
                "vision_last_hidden_state": vision_summary(pix),
                "image_features_shape": list(image_features.shape),
                "image_features": tolist32(image_features.numpy()),
                "logit_positions": positions,
                "logits": tolist32(logits[positions].numpy()),
                "max_abs_logit_change_without_bidirectional_image_mask": f32(diff_after),
            }
            if case_name == "one_image":
                case.update(greedy(model, input_ids, token_type_ids, pix))
            reference["cases"][case_name] = case

        input_ids, _ = encode_case(MEDGEMMA_PROMPT_TEXT, 0)
        logits = forward_logits(input_ids, None, None)
        logits_tt = forward_logits(input_ids, [0] * len(input_ids), None)
        assert torch.equal(logits, logits_tt)
        reference["cases"]["text_only"] = {
            "prompt": MEDGEMMA_PROMPT_TEXT,
            "input_ids": input_ids,
            "seq_len": len(input_ids),
            "logit_positions": [len(input_ids) - 1],
            "logits": tolist32(logits[-1:].numpy()),
            "argmax_last": int(logits[-1].argmax()),
        }

    write_json(out_dir / "reference.json", reference)
    return {"keys": shapes, "init": init_report, "ids": ids, "vocab": (tok_vocab, vocab_size)}


def greedy(model, input_ids, token_type_ids, pix, steps=8):
    ii = torch.tensor([input_ids])
    gen = model.generate(
        input_ids=ii,
        attention_mask=torch.ones_like(ii),
        pixel_values=pix,
        token_type_ids=torch.tensor([token_type_ids]),
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        use_cache=True,
    )
    new_ids = gen.sequences[0, len(input_ids):].tolist()
    assert len(new_ids) == steps, new_ids
    step_logits = [l[0] for l in gen.logits]
    # Cross-check against a cache-free loop of full forwards (generated tokens are text: type 0).
    ids = list(input_ids)
    tt = list(token_type_ids)
    max_diff = 0.0
    margins = []
    nocache_logits = []
    for s in range(steps):
        t = torch.tensor([ids])
        out = model(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=pix,
                    token_type_ids=torch.tensor([tt]), use_cache=False).logits[0, -1]
        max_diff = max(max_diff, float((out - step_logits[s]).abs().max()))
        nxt = int(out.argmax())
        assert nxt == new_ids[s], (s, nxt, new_ids[s])
        top2 = torch.topk(out, 2).values
        margins.append(f32(top2[0] - top2[1]))
        nocache_logits.append(out)
        ids.append(nxt)
        tt.append(0)
    print(f"[medgemma:greedy] ids={new_ids} margins={margins} cache-vs-nocache max diff={max_diff:.3g}")
    assert max_diff < 1e-3
    return {
        "greedy_ids": new_ids,
        "greedy_top2_margins": margins,
        "greedy_note": "HF generate(do_sample=False, max_new_tokens=8, eos stopping disabled), same inputs incl. "
        "pixel_values and token_type_ids; generated tokens have token_type_id 0. Margins (top1-top2 logit) are "
        "from a cache-free full forward at each step, which matched generate's ids.",
        "greedy_step_logits_argmax_check_max_abs_diff": f32(max_diff),
        "greedy_step_logits": tolist32(torch.stack(step_logits).numpy()),
        "greedy_step_logits_note": "greedy_step_logits[s] = full vocab logits (from generate, KV-cached) that "
        "chose greedy_ids[s]; row 0 is the last prompt position.",
    }


# --------------------------------------------------------------------------- tiny MedSigLIP

SIGLIP_LABELS = ["chest x-ray with cardiomegaly", "normal chest x-ray", "fundus photograph", "skin lesion"]


def make_medsiglip(out_dir, tmp):
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_siglip_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = ((tok_vocab + 7) // 8) * 8
    eos = tok.token_to_id("</s>")

    image_processor = SiglipImageProcessor(
        do_resize=True,
        size={"height": 448, "width": 448},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    image_processor.save_pretrained(out_dir)

    config = SiglipConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=SIGLIP_MAX_LEN,
            projection_size=32,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            attention_dropout=0.0,
            pad_token_id=eos,
            eos_token_id=eos,
            bos_token_id=eos,
        ),
        vision_config=vision_config_dict(448, True),
    )
    torch.manual_seed(0)
    model = SiglipModel._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    special = {
        "logit_scale": lambda shape: torch.full(shape, math.log(20.0)),
        "logit_bias": lambda shape: torch.full(shape, -2.0),
    }
    init_report = reinit_(model, seed=20250202, special=special)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
    assert set(keys) == set(model.state_dict().keys()), set(keys) ^ set(model.state_dict().keys())

    # text inputs: what SiglipProcessor(padding="max_length", max_length=64) produces
    encs = tok.encode_batch(SIGLIP_LABELS)
    input_ids = [e.ids for e in encs]
    attention_mask = [e.attention_mask for e in encs]
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"), pad_token="</s>",
                                     eos_token="</s>", unk_token="<unk>")
    hf = hf_tok(SIGLIP_LABELS, padding="max_length", max_length=SIGLIP_MAX_LEN, truncation=True)
    assert hf["input_ids"] == input_ids and hf["attention_mask"] == attention_mask
    for ids in input_ids:
        assert len(ids) == SIGLIP_MAX_LEN

    pix = torch.from_numpy(synthetic_pixels(0, 448)[None])
    ii = torch.tensor(input_ids)
    am = torch.tensor(attention_mask)
    with torch.no_grad():
        out = model(input_ids=ii, attention_mask=am, pixel_values=pix)
        out_nomask = model(input_ids=ii, pixel_values=pix)
        img_un = model.get_image_features(pixel_values=pix)
        txt_un = model.get_text_features(input_ids=ii, attention_mask=am)
        txt_un_nomask = model.get_text_features(input_ids=ii)
        vis = model.vision_model(pixel_values=pix)
    assert torch.allclose(out.image_embeds, img_un / img_un.norm(dim=-1, keepdim=True))
    assert torch.allclose(out.text_embeds, txt_un / txt_un.norm(dim=-1, keepdim=True))
    assert not torch.allclose(out.text_embeds, out_nomask.text_embeds)
    lhs = vis.last_hidden_state[0]
    probs = torch.sigmoid(out.logits_per_image)
    print(f"[medsiglip] logits_per_image={out.logits_per_image.tolist()} probs={probs.tolist()}")

    reference = {
        "description": (
            "Reference outputs of transformers' SiglipModel (eager attention, float32, CPU, eval, no_grad) for "
            "the random-weight checkpoint in this folder. Main outputs use input_ids AND attention_mask as "
            "SiglipProcessor(padding='max_length', max_length=64) returns them; *_no_attention_mask variants "
            "pass input_ids only (big_vision style, every position attends to every position)."
        ),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "tolerance_note": "float32 CPU reference; compare with ~1e-4 absolute (1e-3 absolute + relative is safe).",
        "pixel_formula": PIXEL_FORMULA.replace("S, S", "448, 448"),
        "image_size": 448,
        "special_token_ids": {t: tok.token_to_id(t) for t in SIGLIP_SPECIALS},
        "vocab_size_tokenizer": tok_vocab,
        "vocab_size_config": vocab_size,
        "labels": SIGLIP_LABELS,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "logit_scale": f32(model.logit_scale.item()),
        "logit_bias": f32(model.logit_bias.item()),
        "image_embeds": tolist32(out.image_embeds.numpy()),
        "image_embeds_unnormalized": tolist32(img_un.numpy()),
        "text_embeds": tolist32(out.text_embeds.numpy()),
        "text_embeds_unnormalized": tolist32(txt_un.numpy()),
        "logits_per_image": tolist32(out.logits_per_image.numpy()),
        "probs": tolist32(probs.numpy()),
        "text_embeds_no_attention_mask": tolist32(out_nomask.text_embeds.numpy()),
        "text_embeds_unnormalized_no_attention_mask": tolist32(txt_un_nomask.numpy()),
        "logits_per_image_no_attention_mask": tolist32(out_nomask.logits_per_image.numpy()),
        "probs_no_attention_mask": tolist32(torch.sigmoid(out_nomask.logits_per_image).numpy()),
        "vision_last_hidden_state": {
            "shape": list(lhs.shape),
            "first_rows": tolist32(lhs[:4].numpy()),
            "sum": float(lhs.double().sum()),
            "sum_of_squares": float((lhs.double() ** 2).sum()),
        },
    }
    write_json(out_dir / "reference.json", reference)
    return {"keys": shapes, "init": init_report, "vocab": (tok_vocab, vocab_size)}


# --------------------------------------------------------------------------- image preprocessing

SAMPLE_COUNT = 4000


def make_image_preprocessing(images_dir, out_path, fixtures):
    procs = {
        "tiny-medgemma": Gemma3ImageProcessor.from_pretrained(str(fixtures / "tiny-medgemma")),
        "tiny-medsiglip": SiglipImageProcessor.from_pretrained(str(fixtures / "tiny-medsiglip")),
    }
    cases = []
    for rel in ["cxr/nih-cxr14-00000001_000.png", "fundus/skimage-retina.jpg"]:
        with Image.open(images_dir / rel) as im:
            src_mode, src_size = im.mode, im.size
            rgb = im.convert("RGB")
        for name, proc in procs.items():
            kwargs = {"do_pan_and_scan": False} if name == "tiny-medgemma" else {}
            pv = proc(images=rgb, return_tensors="np", **kwargs)["pixel_values"][0]
            assert pv.dtype == np.float32, pv.dtype
            c, h, w = pv.shape
            flat = pv.ravel()
            n = c * h * w
            idx = [(i * 7919 * 3 + 13) % n for i in range(SAMPLE_COUNT)]
            per_c = pv.reshape(c, -1).astype(np.float64)
            cases.append({
                "file": rel,
                "source_mode": src_mode,
                "source_size_wh": list(src_size),
                "processor": name,
                "shape": [int(c), int(h), int(w)],
                "channel_mean": [float(v) for v in per_c.mean(axis=1)],
                "channel_std": [float(v) for v in per_c.std(axis=1)],
                "samples": [[int(i), f32(flat[i])] for i in idx],
            })
    dicoms = []
    for rel in ["dicom/RG1_J2KI.dcm", "dicom/CT_small.dcm"]:
        ds = pydicom.dcmread(str(images_dir / rel))
        arr = ds.pixel_array
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.SamplesPerPixel)
        flat = arr.ravel()
        assert flat.size == rows * cols * spp
        n = flat.size
        idx = [(i * 7919 + 13) % n for i in range(SAMPLE_COUNT)]
        entry = {
            "file": rel,
            "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
            "transfer_syntax_name": ds.file_meta.TransferSyntaxUID.name,
            "rows": rows,
            "columns": cols,
            "samples_per_pixel": spp,
            "photometric_interpretation": str(ds.PhotometricInterpretation),
            "bits_allocated": int(ds.BitsAllocated),
            "bits_stored": int(ds.BitsStored),
            "high_bit": int(ds.HighBit),
            "pixel_representation": int(ds.PixelRepresentation),
            "pixel_array_dtype": str(arr.dtype),
            "pixel_array_shape": list(arr.shape),
        }
        if spp > 1:
            entry["planar_configuration"] = int(ds.get("PlanarConfiguration", 0))
        for key, attr in [("rescale_slope", "RescaleSlope"), ("rescale_intercept", "RescaleIntercept"),
                          ("window_center", "WindowCenter"), ("window_width", "WindowWidth")]:
            if attr in ds:
                v = ds[attr].value
                if isinstance(v, pydicom.multival.MultiValue):
                    v = v[0]
                entry[key] = float(v)
        entry.update({
            "min": int(flat.min()),
            "max": int(flat.max()),
            "mean": float(flat.astype(np.float64).mean()),
            "samples": [[int(i), int(flat[i])] for i in idx],
        })
        dicoms.append(entry)
    import openjpeg
    import pylibjpeg

    doc = {
        "description": "Reference image decoding / preprocessing for the real images in shared/fixtures/images "
        "(paths relative to that folder). Processors are built from the preprocessor_config.json files of "
        "tests/fixtures/tiny-medgemma and tests/fixtures/tiny-medsiglip (slow, PIL-based transformers image "
        "processors). Pipeline: PIL Image.open(...).convert('RGB') -> uint8 HWC -> PIL resize to (W,H) with the "
        "configured resample filter on the uint8 image (result rounded to uint8) -> float32 x*(1/255) (computed as "
        "float64 then cast to float32) -> (x - 0.5) / 0.5 in float32 -> CHW.",
        "sample_formula_cases": "samples[i] = [j, pixel_values_chw_flat[j]] with j = (i * 7919 * 3 + 13) % (3*H*W), "
        "i in 0..4000",
        "sample_formula_dicom": "samples[i] = [j, stored_flat[j]] with j = (i * 7919 + 13) % (rows*columns*"
        "samples_per_pixel), i in 0..4000, stored_flat = pydicom pixel_array (raw stored values, no modality/VOI "
        "LUT) flattened in C order",
        "versions": {
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "pydicom": pydicom.__version__,
            "pylibjpeg": pylibjpeg.__version__,
            "pylibjpeg-openjpeg": openjpeg.__version__,
            "openjpeg": ".".join(str(v) for v in openjpeg.utils.get_openjpeg_version()),
        },
        "cases": cases,
        "dicom": dicoms,
    }
    write_json(out_path, doc)
    return doc


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=os.environ.get("CHARTLINE_FIXTURE_IMAGES", str(DEFAULT_IMAGES)))
    ap.add_argument("--out", default=str(FIXTURES))
    args = ap.parse_args()
    out = Path(args.out)
    images_dir = Path(args.images)
    if not images_dir.is_dir():
        sys.exit(f"images folder not found: {images_dir}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for sub in ["tiny-medgemma", "tiny-medsiglip"]:
            if (out / sub).exists():
                shutil.rmtree(out / sub)
        g = make_medgemma(out / "tiny-medgemma", tmp)
        s = make_medsiglip(out / "tiny-medsiglip", tmp)
    make_image_preprocessing(images_dir, out / "image-preprocessing.json", out)
    manifest = {"tiny-medgemma": g["keys"], "tiny-medsiglip": s["keys"]}
    write_json(out / "tensor-manifest.json", manifest)
    print("special token ids:", g["ids"], "gemma vocab (tokenizer, config):", g["vocab"],
          "siglip vocab:", s["vocab"])
    print("done")


if __name__ == "__main__":
    main()
