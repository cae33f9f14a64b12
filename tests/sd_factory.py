"""A tiny random-weight sd1.5-lcm bundle in AXERA's layout, built directly as ONNX.

The graphs keep the real bundle's interface (tensor ranks, names, dtypes, the 8x VAE factor, the
77-token CLIP context and a BPE tokenizer in CLIP's files) at toy sizes: a 64x64 image from an
8x8 latent. Every input changes the output: the prompt through the text embeddings, the timestep
through the time embedding, the latent through a convolution.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from npu.diffusion.clip_tokenizer import BOS, EOS, SPLIT
from npu.diffusion.scheduler import lcm_timesteps

TEXT_DIM = 32
TIME_DIM = 64
LATENT = 8  # 8x8 latent -> 64x64 image
CONTEXT = 77
UNET_TIME_INPUT = "/down_blocks.0/resnets.0/act_1/Mul_output_0"  # the name AXERA's export gives it
CORPUS = [
    "a cat wearing sunglasses", "a peaceful mountain lake at sunrise, pine trees, reflection in the water",
    "landscape photography", "astronauts in a jungle, cold color palette, muted colors, detailed, 8k",
    "a lighthouse in a storm at night", "an oil painting of a red fox in the snow", "neon city streets",
    "a bowl of fruit on a wooden table", "portrait of an old sailor, dramatic light", "abstract shapes",
    "two beautiful girls", "the sea in one line", "a garden of glass flowers", "rain over the gallery",
]


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sd_factory")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def write_tokenizer(folder: Path) -> int:
    """CLIP-format vocab.json + merges.txt trained on a small corpus; returns the vocabulary size."""
    tokenizer = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": EOS, "model_max_length": CONTEXT}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS,
                                                                "pad_token": EOS, "unk_token": EOS}))
    return tokenizer.get_vocab_size()


def text_encoder_graph(vocab: int, rng: np.random.Generator) -> onnx.GraphProto:
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["tok"]),
        helper.make_node("Add", ["tok", "pos"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["hw"]),
        helper.make_node("Tanh", ["hw"], ["last_hidden_state"]),
    ]
    inits = [
        _init("embed", rng.normal(0, 1, (vocab, TEXT_DIM)).astype(np.float32)),
        _init("pos", rng.normal(0, 0.1, (CONTEXT, TEXT_DIM)).astype(np.float32)),
        _init("w", rng.normal(0, 1 / TEXT_DIM**0.5, (TEXT_DIM, TEXT_DIM)).astype(np.float32)),
    ]
    return helper.make_graph(
        nodes, "text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, CONTEXT])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, CONTEXT, TEXT_DIM])],
        inits,
    )


def unet_graph(rng: np.random.Generator, latent: int = LATENT) -> onnx.GraphProto:
    nodes = [
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["text_mean"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["text_mean", "w_text"], ["text_vec"]),
        helper.make_node("MatMul", [UNET_TIME_INPUT, "w_time"], ["time_vec"]),
        helper.make_node("Add", ["text_vec", "time_vec"], ["cond"]),
        helper.make_node("Reshape", ["cond", "cond_shape"], ["cond4"]),
        helper.make_node("Conv", ["sample", "w_conv"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv", "cond4"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["act"]),
        helper.make_node("Mul", ["act", "gain"], ["out_sample"]),
    ]
    inits = [
        _init("w_text", rng.normal(0, 1.0, (TEXT_DIM, 4)).astype(np.float32)),
        _init("w_time", rng.normal(0, 1 / TIME_DIM**0.5, (TIME_DIM, 4)).astype(np.float32)),
        _init("cond_shape", np.array([1, 4, 1, 1], dtype=np.int64)),
        _init("w_conv", rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)),
        _init("gain", np.array(1.5, dtype=np.float32)),
    ]
    return helper.make_graph(
        nodes, "unet",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 4, latent, latent]),
            helper.make_tensor_value_info(UNET_TIME_INPUT, TensorProto.FLOAT, [1, TIME_DIM]),
            helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, [1, CONTEXT, TEXT_DIM]),
        ],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1, 4, latent, latent])],
        inits,
    )


def vae_decoder_graph(rng: np.random.Generator, latent: int = LATENT) -> onnx.GraphProto:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["wide"]),
        helper.make_node("DepthToSpace", ["wide"], ["big"], blocksize=8, mode="CRD"),
        helper.make_node("Tanh", ["big"], ["sample"]),
    ]
    inits = [_init("w", rng.normal(0, 0.5, (3 * 64, 4, 1, 1)).astype(np.float32))]
    return helper.make_graph(
        nodes, "vae_decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, latent, latent])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 3, latent * 8, latent * 8])],
        inits,
    )


def time_table(rng: np.random.Generator) -> np.ndarray:
    """A sinusoidal embedding per training timestep, through a fixed random projection and SiLU."""
    t = np.arange(1000, dtype=np.float64)[:, None]
    freqs = np.exp(-np.log(10000) * np.arange(TIME_DIM // 2) / (TIME_DIM // 2))[None, :]
    sinus = np.concatenate([np.cos(t * freqs), np.sin(t * freqs)], axis=1)
    proj = sinus @ rng.normal(0, 1 / TIME_DIM**0.5, (TIME_DIM, TIME_DIM))
    return (proj / (1 + np.exp(-proj))).astype(np.float32)


def build_sd_bundle(
    dest: Path, *, full_time_table: bool = False, seed: int = 0, latent: int = LATENT
) -> Path:
    """Write the bundle: AXERA's 4-row time table, or (``full_time_table``) one row per timestep.

    ``latent`` 64 gives the real model's 512x512 images (the graphs stay tiny).
    """
    rng = np.random.default_rng(seed)
    vocab = write_tokenizer(dest / "tokenizer")
    _save(text_encoder_graph(vocab, rng), dest / "text_encoder" / "sd15_text_encoder_sim.onnx")
    _save(unet_graph(rng, latent), dest / "unet.onnx")
    _save(vae_decoder_graph(rng, latent), dest / "vae_decoder.onnx")
    table = time_table(rng)
    if full_time_table:
        np.save(dest / "time_embeddings.npy", table)
    else:
        np.save(dest / "time_input_txt2img.npy", table[lcm_timesteps(4)])
    return dest
