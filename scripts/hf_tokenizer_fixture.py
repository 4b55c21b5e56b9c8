#!/usr/bin/env python3
"""Build the HF `tokenizers` fixture that ties EP Lab's tokenizer (common/model/tokenizer.*) to Hugging Face's.

Needs only the pure-CPU `tokenizers` package (no transformers, no torch, no network):

    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokenizers
    /tmp/tokvenv/bin/python scripts/hf_tokenizer_fixture.py          # writes tests/data/tokenizer/

The real microsoft/Phi-tiny-MoE-instruct tokenizer.json (32064 ids, Llama/Phi-3 SentencePiece-BPE) cannot be
shipped or fetched in tests, so this script makes a small tokenizer *of the same kind*:
 1. trains a BPE model (unk <unk>, byte_fallback=True, fuse_unk=True) on the short English corpus below, with the
    Llama normalizer (Prepend "▁", Replace " " -> "▁") and no pre-tokenizer, so merges may cross word boundaries
    as they do in Llama's vocab;
 2. lays the vocab out like Llama/Phi-3: 0 <unk>, 1 <s>, 2 </s>, 3..258 the byte tokens <0x00>..<0xFF>, then the
    learned pieces (~500 ids in the model), merges unchanged;
 3. adds Phi-3's special tokens after the model vocab in Phi-3's order (<|endoftext|>, <|assistant|>,
    <|placeholder1..4|>, <|system|>, <|end|>, <|placeholder5..6|>, <|user|>) with Phi-3's flags (rstrip=True on all
    but <|endoftext|>), and Llama's post-processor "<s> $A";
 4. writes two files:
      tokenizer.json            the legacy Llama/Phi-3 layout: normalizer Sequence[Prepend, Replace],
                                pre_tokenizer null, decoder Sequence[Replace, ByteFallback, Fuse, Strip],
                                merges as [a, b] pairs (as tokenizers >= 0.20 writes them)
      tokenizer_metaspace.json  the newer layout transformers writes for legacy=False: normalizer null,
                                pre_tokenizer Metaspace(prepend_scheme="first", split=False), merges rewritten as
                                "a b" strings (the older on-disk form), and lstrip on <|end|> to cover lstrip too
 5. encodes a list of test strings with each file (HF tokenizers is the reference), and writes expected.json:
    per string the ids without and with special tokens, the token strings, and HF's decode with and without
    skip_special_tokens; plus Phi-3.5's chat template rendered for a few conversations (see CHAT_TEMPLATE).

Deterministic: running it twice gives byte-identical files (checked with tokenizers 0.23.3).
"""
import argparse
import json
import os
import sys

from tokenizers import AddedToken, Tokenizer, __version__ as TOKENIZERS_VERSION
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = """\
Mixture of experts models route every token to a small number of experts. A router scores each expert for the
token, the top two experts are chosen, and their outputs are mixed with the router's weights. Because only two of
the sixteen experts run for a token, the model holds many more parameters than it uses for any one token.
Expert parallelism places the experts on different GPUs. Each GPU keeps a few experts and the shared layers. The
tokens that a GPU holds are sent to the GPUs that own their experts, the experts run, and the results are sent
back. This exchange is an all-to-all: every rank sends to every other rank, and the amount of data depends on
the routing.
The tokenizer turns text into numbers. It splits the text into pieces that it has seen often, such as common
words and parts of words, and gives every piece an id. Rare characters are written as their bytes, so that no
text is ever lost. The model reads the ids, predicts the next id, and the tokenizer turns the ids back into text.
A good course shows one idea at a time. First one GPU runs the whole layer, then the experts are placed by hand,
then the ranks exchange tokens with NCCL. At the end the real model answers a question, and every expert
parallel size gives the same answer.
Numbers matter too: 16 experts, 2 per token, 32 layers, 4096 hidden units, 448 intermediate units per expert,
and 3.8 billion parameters in total. The quick brown fox jumps over the lazy dog. Hello, world! How are you
today? I am fine, thank you. What is the capital of France? The capital of France is Paris.
"""

# Phi-3's added tokens after the model vocab, in Phi-3's order (32000.. in Phi-3), with Phi-3's rstrip flags.
PHI3_SPECIALS = [
    ("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True), ("<|placeholder2|>", True),
    ("<|placeholder3|>", True), ("<|placeholder4|>", True), ("<|system|>", True), ("<|end|>", True),
    ("<|placeholder5|>", True), ("<|placeholder6|>", True), ("<|user|>", True),
]

# Phi-3.5 (mini and MoE) tokenizer_config.json "chat_template"; Phi-tiny-MoE-instruct's model card shows the same
# format ("<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n...<|end|>\n<|assistant|>\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def render_chat(messages, add_generation_prompt, eos_token="<|endoftext|>"):
    """CHAT_TEMPLATE written out in Python (no jinja2 needed); the C++ side is checked against this."""
    out = ""
    for m in messages:
        if m["role"] == "system" and m["content"]:
            out += "<|system|>\n" + m["content"] + "<|end|>\n"
        elif m["role"] == "user":
            out += "<|user|>\n" + m["content"] + "<|end|>\n"
        elif m["role"] == "assistant":
            out += "<|assistant|>\n" + m["content"] + "<|end|>\n"
    return out + ("<|assistant|>\n" if add_generation_prompt else eos_token)


TEST_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Expert parallelism places the experts on different GPUs.",
    "hello",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "two  spaces and   three",
    "Numbers: 16 experts, 2 per token, 3.8 billion, 4096 x 448 = 1835008.",
    "Punctuation!? (yes) [no] {maybe} <tag> a/b c\\d e|f ~`@#$%^&*_-+=;:'\",.",
    "line one\nline two\n\nline four",
    "\ttab\tseparated\t",
    "\n",
    "naïve café 東京 🙂",
    "Zürich – “quotes” — ellipsis…",
    "mixed ünïcödé and ASCII in one word: straße",
    "emoji only 🙂🚀👍🏽",
    "<s>",
    "</s>",
    "<unk>",
    "<|endoftext|>",
    "Hello<|endoftext|>world",
    "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n",
    "<|user|>   spaces after a special<|end|>   \n\n<|assistant|>",
    "text before <|end|> text after",
    "a<|end|><|end|>b",
    "<|user|><|assistant|>",
    "<|notatoken|> and <|end| and |end|>",
    "<0x41> is not a byte token in text",
    "▁ already has the meta space",
    "UPPER lower MiXeD",
    "experts expert expertise expertly",
    "a" * 40,
    "the the the the the the",
    # repeated pairs (merges f+f, C+C, m+m) and pairs whose reverse is also a merge: the order of equal-rank
    # merges (leftmost first) decides these
    "fff CCCCC mmm ffff",
    "tot onon caca erer t t",
]

CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "How to explain Internet for a medieval knight?"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": ""},
                  {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Name two experts.\nThanks."}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
     "add_generation_prompt": False},
]


def train_pieces(vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    # Lines without "\n": newline, tab and every non-ASCII character must go through byte fallback, as in Phi-3
    # for characters outside its vocab.
    lines = [l for l in CORPUS.split("\n") if l]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False, limit_alphabet=200)
    tok.train_from_iterator(lines, trainer=trainer)
    d = json.loads(tok.to_str())
    return d["model"]["vocab"], d["model"]["merges"]


def build(vocab_size):
    learned, merges = train_pieces(vocab_size)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for piece, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ["<unk>", "<s>", "</s>"]])
    tok.add_special_tokens([AddedToken(t, rstrip=r, normalized=False, special=True) for t, r in PHI3_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def metaspace_variant(legacy_json):
    """The layout transformers writes with legacy=False; merges as "a b" strings; lstrip on <|end|>."""
    d = json.loads(legacy_json)
    d["normalizer"] = None
    d["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]
    for t in d["added_tokens"]:
        if t["content"] == "<|end|>":
            t["lstrip"] = True
    return Tokenizer.from_str(json.dumps(d))


def cases(tok):
    out = []
    for s in TEST_STRINGS:
        plain = tok.encode(s, add_special_tokens=False)
        with_bos = tok.encode(s, add_special_tokens=True)
        out.append({
            "text": s,
            "ids": plain.ids,
            "tokens": plain.tokens,
            "ids_add_special": with_bos.ids,
            "decoded": tok.decode(plain.ids, skip_special_tokens=True),
            "decoded_keep_special": tok.decode(plain.ids, skip_special_tokens=False),
        })
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=500, help="trained vocab before the 256 byte tokens")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    legacy = build(args.vocab_size)
    legacy_json = legacy.to_str()
    meta = metaspace_variant(legacy_json)
    # Compact JSON keeps the fixture small; our reader does not care about layout.
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(json.loads(legacy_json), ensure_ascii=False, separators=(",", ":")) + "\n")
    with open(os.path.join(args.out, "tokenizer_metaspace.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(json.loads(meta.to_str()), ensure_ascii=False, separators=(",", ":")) + "\n")

    chats = []
    for c in CHATS:
        text = render_chat(c["messages"], c["add_generation_prompt"])
        chats.append({**c, "text": text,
                      "ids": legacy.encode(text, add_special_tokens=False).ids,
                      "ids_metaspace": meta.encode(text, add_special_tokens=False).ids})

    expected = {
        "made_by": "scripts/hf_tokenizer_fixture.py",
        "tokenizers_version": TOKENIZERS_VERSION,
        "python": sys.version.split()[0],
        "model_vocab_size": legacy.get_vocab_size(with_added_tokens=False),
        "vocab_size": legacy.get_vocab_size(with_added_tokens=True),
        "bos": "<s>", "bos_id": legacy.token_to_id("<s>"),
        "eos": "<|endoftext|>", "eos_id": legacy.token_to_id("<|endoftext|>"),
        "special_ids": {t: legacy.token_to_id(t) for t in ["<unk>", "<s>", "</s>"] + [t for t, _ in PHI3_SPECIALS]},
        "chat_template": CHAT_TEMPLATE,
        "variants": {"tokenizer.json": cases(legacy), "tokenizer_metaspace.json": cases(meta)},
        "chats": chats,
    }
    with open(os.path.join(args.out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in sorted(os.listdir(args.out))}
    print(f"tokenizers {TOKENIZERS_VERSION}: model vocab {expected['model_vocab_size']}, "
          f"with added tokens {expected['vocab_size']}; wrote {sizes} to {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
