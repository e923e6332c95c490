"""A tiny random BERT encoder (BertModel weights, a few hundred WordPiece tokens, segment
ids), built offline: the stand-in for BERT/MiniLM reward-model trunks such as the
sentence-transformers all-MiniLM-L6-v2 (tests/test_encoder_rm.py)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import QUICKSTART


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in (QUICKSTART / "prefs_train.jsonl").read_text().splitlines()[:400]]
    return [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]


def make_tiny_bert(out: Path, pooler: bool = True, sentence_transformers: bool = False, seed: int = 0,
                   layers: int = 2) -> Path:
    """Save a random-init ``BertModel`` (safetensors; with or without pooler weights)
    and its fast WordPiece tokenizer ([CLS] a [SEP] b [SEP], [PAD] = 0, no EOS) to
    ``out``. ``sentence_transformers`` adds the modules.json + 1_Pooling/config.json
    (mean pooling) a sentence-transformers checkpoint ships."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(_corpus(), vocab_size=300, min_frequency=2,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wp.save_model(str(out))  # vocab.txt
    vocab = {word: i for i, word in enumerate((out / "vocab.txt").read_text().splitlines())}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, type_vocab_size=2,
                        pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config, add_pooling_layer=pooler).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if sentence_transformers:
        (out / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return out
