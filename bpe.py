"""A byte-level BPE trainer (Sennrich et al., 2016, on bytes as GPT-2 does), small enough to read: the toy
benchmark's vocabulary is made with it from the toy's training split (issue #24; toy.py).

    1. Split the text into pieces, as the tokenizer will (SPLIT: a word with its leading space, a number,
       a run of punctuation, spaces), and count each distinct piece.
    2. Every piece starts as its bytes: the 256 single bytes are the first 256 tokens.
    3. Repeat: count every adjacent pair of tokens over all pieces (a piece counts as often as it occurs),
       and merge the most frequent pair everywhere into one new token. A tie goes to the pair whose two
       byte strings sort first, so the same text always gives the same vocabulary.
    4. Stop at the vocabulary size, or when no pair occurs twice.

The merges, in order, are the tokenizer: tiktoken applies them by rank (data.py loads them like GPT-2's
vocab.json + merges.txt, which `files` writes).
"""
import json
import re
from collections import Counter, defaultdict

# GPT-2's split pattern (data.GPT2_PATTERN) restricted to ASCII, which Python's re can run (\p{L} needs
# the regex package); the toy's text is ASCII, where the two split alike (tested)
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""


def train(texts, vocab_size):
    """texts (strings) -> the merges [(left bytes, right bytes)], at most vocab_size - 256 of them."""
    counts = Counter(piece.encode("utf-8") for text in texts for piece in re.findall(SPLIT, text))
    words = {tuple(bytes([b]) for b in piece): n for piece, n in counts.items()}  # a piece as its tokens
    pairs, holders = Counter(), defaultdict(set)  # each pair's count, and the words that hold it
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            pairs[pair] += n
            holders[pair].add(word)
    merges = []
    while 256 + len(merges) < vocab_size and pairs:
        top = max(pairs.values())
        if top < 2:  # no pair repeats: a merge would only memorise one piece
            break
        left, right = min(pair for pair, n in pairs.items() if n == top)  # ties: the pair that sorts first
        merges.append((left, right))
        for word in holders.pop((left, right)):
            n = words.pop(word)
            merged = _merge(word, left, right)
            for pair in zip(word, word[1:]):  # the word's old pairs out, its new ones in
                pairs[pair] -= n
                holders[pair].discard(word)
                if pairs[pair] <= 0:
                    del pairs[pair]
            for pair in zip(merged, merged[1:]):
                pairs[pair] += n
                holders[pair].add(merged)
            words[merged] = n
    return merges


def _merge(word, left, right):
    """The tokens of `word` with every adjacent (left, right) joined, from the left."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            out.append(left + right)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def ranks(merges):
    """tiktoken's mergeable ranks: the 256 bytes (id = byte), then each merge's token in merge order."""
    table = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        table.setdefault(left + right, len(table))
    return table


def files(merges, specials, char_of):
    """(vocab.json text, merges.txt text) in GPT-2's format: tokens written through GPT-2's byte ->
    character map `char_of` (data._bytes_to_unicode), ids = ranks, then the special tokens."""
    spell = lambda token: "".join(char_of[b] for b in token)
    vocab = {spell(token): rank for token, rank in ranks(merges).items()}
    vocab.update({special: len(vocab) + i for i, special in enumerate(specials)})
    lines = ["#version: 0.2"] + [f"{spell(left)} {spell(right)}" for left, right in merges]
    return json.dumps(vocab, ensure_ascii=False), "\n".join(lines) + "\n"
