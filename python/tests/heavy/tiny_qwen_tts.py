"""A tiny, randomly initialised Qwen3-TTS checkpoint built from qwen-tts's own config classes.

The layout is that of the official model directories (config.json, generation_config.json,
model.safetensors, the text tokenizer, speech_tokenizer/), so Qwen3TTSModel.from_pretrained
loads it exactly as it loads the real thing; only the sizes are tiny and the weights random,
so it speaks noise, fast, with nothing downloaded.
"""

import inspect
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast

from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig

CODEBOOK_SIZE = 64  # audio codes 0..63; the talker's last 1024 ids are its control tokens
CODE_GROUPS = 4
HIDDEN = 32
TALKER_VOCAB = CODEBOOK_SIZE + 1024
SPECIAL = {  # control ids, all in the talker's last 1024
    "codec_pad_id": 1064, "codec_bos_id": 1065, "codec_eos_token_id": 1066, "codec_think_id": 1067,
    "codec_nothink_id": 1068, "codec_think_bos_id": 1069, "codec_think_eos_id": 1070,
}
SPEAKERS = {"vivian": 1071, "ryan": 1072}
LANGUAGES = {"english": 1080, "chinese": 1081}
TEXT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_text_bos|>", "<|tts_text_eod|>"]
MODES = ("custom_voice", "base", "voice_design")


def _text_tokenizer():
    """A byte-level BPE small enough to train here, in which "assistant" and "user" are one token each."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=TEXT_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["assistant user assistant\nuser\n", "Hello world, this is a test of speech."] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    return Qwen2TokenizerFast(tokenizer_object=tokenizer, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|tts_pad|>", unk_token=None,
                              additional_special_tokens=TEXT_SPECIAL_TOKENS)


def _speech_tokenizer_config():
    return Qwen3TTSTokenizerV2Config(
        encoder_config=dict(
            hidden_size=HIDDEN, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
            codebook_size=CODEBOOK_SIZE, codebook_dim=16, num_quantizers=CODE_GROUPS,
            vector_quantization_hidden_dimension=16, num_semantic_quantizers=1, upsample_groups=HIDDEN,
            num_hidden_layers=1, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16, frame_rate=12.5, sampling_rate=24000,
        ),
        decoder_config=dict(
            codebook_size=CODEBOOK_SIZE, codebook_dim=16, hidden_size=HIDDEN, latent_dim=HIDDEN,
            num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=1,
            num_quantizers=CODE_GROUPS, upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], decoder_dim=32,
        ),
        encoder_valid_num_quantizers=CODE_GROUPS,
    )


def _model_config(mode, text_vocab):
    talker = dict(
        vocab_size=TALKER_VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, text_hidden_size=HIDDEN,
        text_vocab_size=text_vocab, num_code_groups=CODE_GROUPS,
        rope_scaling={"mrope_section": [4, 2, 2], "interleaved": True, "rope_type": "default"},
        position_id_per_seconds=13,
        spk_id=SPEAKERS if mode == "custom_voice" else {},
        spk_is_dialect={name: False for name in SPEAKERS} if mode == "custom_voice" else {},
        codec_language_id=LANGUAGES,
        code_predictor_config=dict(
            vocab_size=CODEBOOK_SIZE, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_code_groups=CODE_GROUPS,
        ),
        **SPECIAL,
    )
    speaker_encoder = dict(enc_dim=HIDDEN, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8,
                           enc_se_channels=8, enc_res2net_scale=2)
    return talker, speaker_encoder


def _keep_only_init_arguments(config_path, key, config_class):
    """The speaker encoder's config class takes no **kwargs, but save_pretrained adds generic keys."""
    with open(config_path) as source:
        config = json.load(source)
    accepted = inspect.signature(config_class.__init__).parameters
    config[key] = {name: value for name, value in config[key].items() if name in accepted}
    with open(config_path, "w") as out:
        json.dump(config, out, indent=2)


def build(directory, mode, seed=0):
    """Write a tiny checkpoint of one mode ("custom_voice", "base", "voice_design") to directory."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    torch.manual_seed(seed)
    os.makedirs(directory, exist_ok=True)
    text_tokenizer = _text_tokenizer()
    text_tokenizer.save_pretrained(directory)
    ids = text_tokenizer.convert_tokens_to_ids
    text_vocab = len(text_tokenizer)
    talker, speaker_encoder = _model_config(mode, text_vocab)
    config = Qwen3TTSConfig(
        talker_config=talker, speaker_encoder_config=speaker_encoder, tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size="tiny", tts_model_type=mode,
        im_start_token_id=ids("<|im_start|>"), im_end_token_id=ids("<|im_end|>"),
        tts_pad_token_id=ids("<|tts_pad|>"), tts_bos_token_id=ids("<|tts_text_bos|>"),
        tts_eos_token_id=ids("<|tts_text_eod|>"),
    )
    model = Qwen3TTSForConditionalGeneration(config)
    model.save_pretrained(directory)
    _keep_only_init_arguments(os.path.join(directory, "config.json"), "speaker_encoder_config",
                              Qwen3TTSSpeakerEncoderConfig)
    with open(os.path.join(directory, "generation_config.json"), "w") as out:
        json.dump({"do_sample": True, "max_new_tokens": 8, "subtalker_dosample": True, "top_k": 50,
                   "top_p": 1.0, "temperature": 0.9, "repetition_penalty": 1.05}, out)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as out:
        json.dump({"processor_class": "Qwen3TTSProcessor"}, out)
    speech_dir = os.path.join(directory, "speech_tokenizer")
    speech = Qwen3TTSTokenizerV2Model(_speech_tokenizer_config())
    speech.save_pretrained(speech_dir)
    with open(os.path.join(speech_dir, "preprocessor_config.json"), "w") as out:
        json.dump({"feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1, "sampling_rate": 24000,
                   "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True}, out)
    return directory


if __name__ == "__main__":
    import sys

    for mode in MODES:
        print(build(os.path.join(sys.argv[1], mode), mode))
