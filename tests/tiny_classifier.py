"""A tiny 2-label encoder classifier (DistilBERT shape, WordPiece tokenizer, no EOS), built
offline: the stand-in for hub sentiment classifiers such as lvwerra/distilbert-imdb."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a an this that movie film story acting plot was is were it i we they great good "
         "wonderful brilliant loved fun superb bad awful boring terrible hated dull weak not very "
         "really quite and but of to in on for with review watched last night").split()


def make_tiny_classifier(out: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """Save a random-init DistilBertForSequenceClassification (safetensors) and its
    fast WordPiece tokenizer ([CLS] text [SEP], [PAD] = 0, no EOS) to ``out``."""
    import torch
    from tokenizers import BertWordPieceTokenizer, processors
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, PreTrainedTokenizerFast

    out = Path(out)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=400, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp._tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  model_max_length=128)
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128, num_labels=num_labels, pad_token_id=tok.pad_token_id,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"} if num_labels == 2 else None,
                              label2id={"NEGATIVE": 0, "POSITIVE": 1} if num_labels == 2 else None)
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
