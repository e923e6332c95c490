"""Generate the quickstart task's data and the tiny preset's tokenizer.

    python data/quickstart/make_quickstart.py

The task: continue a short movie-review prompt ("Review of Silent River:");
the gold scorer is VADER sentiment of the continuation (rlhf.gold). Text comes
from a small template grammar over a few hundred words, so a randomly
initialised tiny GPT-2 can learn it on a CPU in minutes. SFT responses are
balanced in sentiment (mean gold near 0), which leaves PPO room to push it up.

Everything is drawn from one seeded random.Random and written in a fixed
order, so every run produces byte-identical files (tests check this).
Dependencies: standard library, vaderSentiment, tokenizers (and transformers,
only to save the tokenizer in the format the pipeline loads).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

SEED = 20240607
# Bradley-Terry temperature for the synthetic preference labels:
# P(a preferred over b) = sigmoid((gold_a - gold_b) / TAU). Chosen so the
# labels agree with the gold scorer ~85% of the time, like human raters.
TAU = 0.25

N_SFT_TRAIN, N_SFT_TEST = 4000, 400
N_PREFS_TRAIN, N_PREFS_TEST = 3000, 500
N_PROMPTS_TRAIN, N_PROMPTS_TEST = 512, 128
N_TEST_TITLES = 80  # held-out titles: every *_test file uses only these
MIN_WORDS, MAX_WORDS = 8, 30

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0..3
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# ---------------------------------------------------------------- vocabulary

TITLE_ADJ = (
    "Silent Broken Golden Hidden Last Lost Distant Frozen Wild Quiet Northern "
    "Burning Endless Hollow Secret Iron Crimson Midnight Paper Glass Stone "
    "Electric Forgotten Falling Velvet Silver Empty Restless Winter Scarlet"
).split()
TITLE_NOUN = (
    "River Garden City Road Sky Harbor Mountain Letter Horizon Crown Forest "
    "Kingdom Station Island Mirror Summer Shadow Engine Bridge Storm Signal "
    "House Valley Orchard"
).split()
PROMPT_TEMPLATES = [
    "Review of {t}:",
    "My thoughts on {t}:",
    "I watched {t} last night.",
    "{t} review:",
    "Just saw {t}.",
    "What I thought of {t}:",
    "Quick review of {t}:",
    "Here is my take on {t}:",
]

# Aspects carry no sentiment of their own in VADER (no "hero", "villain",
# "romance"), so a sentence's gold score comes from the words chosen for it.
ASPECTS = [
    "acting", "story", "plot", "script", "dialogue", "ending", "soundtrack",
    "music", "cinematography", "pacing", "cast", "direction", "camera work",
    "action", "lead", "editing", "costumes", "effects", "opening", "finale",
    "score", "writing", "twist", "set design", "lighting", "middle act",
    "first half", "last scene", "main character", "supporting cast",
]
# Adjectives by polarity and strength; most are in VADER's lexicon, a few
# (slow, bland, predictable, ...) are not, so wording and gold don't map 1:1.
ADJ = {
    (+1, "strong"): "brilliant wonderful amazing fantastic superb outstanding excellent "
    "magnificent beautiful perfect great gorgeous lovely".split(),
    (+1, "mild"): "good nice solid fun pleasant charming enjoyable fine clever sweet "
    "funny warm fresh smart touching entertaining".split(),
    (-1, "mild"): "dull slow weak boring bland messy poor annoying tired predictable "
    "confusing lame silly disappointing".split(),
    (-1, "strong"): "awful terrible horrible dreadful painful disastrous pathetic "
    "stupid ugly bad lousy miserable".split(),
}
NEUTRAL_ADJ = (
    "long short loud quiet simple familiar dark modern old-fashioned unusual "
    "busy colorful plain serious"
).split()
BOOSTERS = ["very ", "really ", "truly ", "extremely ", "incredibly ", "so ", "quite "]
DAMPENERS = ["somewhat ", "slightly ", "a bit ", "kind of ", "a little "]
VERBS = {+1: ["loved", "liked", "enjoyed", "admired", "adored"],
         -1: ["hated", "disliked", "could not stand", "was bored by", "was annoyed by"]}
NOUNS = {+1: ["a masterpiece", "a triumph", "a delight", "a real treat", "a gem",
              "a small miracle", "a joy to watch"],
         -1: ["a mess", "a disaster", "a failure", "a waste of time", "a bore",
              "a total letdown", "a sad waste of a good cast"]}
FILM_WORDS = ["film", "movie", "picture", "story", "ride", "experience", "watch"]
RECOMMEND = {+1: ["recommend it to everyone", "happily watch it again",
                  "recommend it to my friends", "see it again tomorrow"],
             -1: ["not recommend it", "not watch it again", "ask for my money back",
                  "tell everyone to avoid it"]}
# Neutral filler: plot and viewing context, so responses aren't just adjectives.
ROLES = ("detective teacher farmer pilot doctor sailor painter soldier student "
         "mother father singer driver lawyer widow boxer chef").split()
PLACES = ["a small town", "the city", "a quiet village", "an old hotel", "the desert",
          "a fishing boat", "a big school", "the mountains", "a busy port", "the suburbs"]
GOALS = ["find her brother", "get back to his family", "track down an old car",
         "open a bakery", "cross the country", "sell the old house", "keep the farm",
         "find out what happened"]
TIMES = ["the fifties", "one long summer", "a cold winter", "the sixties", "a single night",
         "a long weekend"]
COMPANY = ["my sister", "a neighbor", "my parents", "my kids", "my brother", "two coworkers"]
VENUES = ["the local cinema", "home", "a matinee", "an old theater", "a late show"]
SOURCES = ["a book", "real events", "a comic book", "a stage show", "a short story",
           "an old legend"]
LENGTHS = ["about two hours", "nearly three hours", "just ninety minutes", "a little too long"]


# ------------------------------------------------------------------ grammar

def make_titles(rng: random.Random) -> list[str]:
    combos = [f"{a} {n}" for a in TITLE_ADJ for n in TITLE_NOUN]
    titles = rng.sample(combos, 400)
    # A third get a leading "The" for variety ("The Hidden Harbor").
    return [("The " + t) if rng.random() < 0.33 else t for t in titles]


def adj(rng: random.Random, pol: int) -> str:
    return rng.choice(ADJ[(pol, rng.choice(["strong", "mild"]))])


def modifier(rng: random.Random, attributive: bool = False) -> str:
    """Optional booster/dampener (VADER scales the next word's score by these)."""
    boosters, dampeners = BOOSTERS, DAMPENERS
    if attributive:  # before a noun: "a very dull film", never "a so dull film"
        boosters, dampeners = BOOSTERS[:-2], DAMPENERS[:2]
    r = rng.random()
    return rng.choice(boosters) if r < 0.3 else rng.choice(dampeners) if r < 0.4 else ""


def sentence(rng: random.Random, pol: int) -> str:
    """One sentence whose overall sentiment is pol (+1, -1 or 0)."""
    if pol == 0:
        k = rng.randrange(7)
        if k == 0:
            return f"The film follows a {rng.choice(ROLES)} in {rng.choice(PLACES)}."
        if k == 1:
            return f"A {rng.choice(ROLES)} tries to {rng.choice(GOALS)}."
        if k == 2:
            return f"The story takes place in {rng.choice(PLACES)} during {rng.choice(TIMES)}."
        if k == 3:
            return f"I saw it with {rng.choice(COMPANY)} at {rng.choice(VENUES)}."
        if k == 4:
            return f"It is based on {rng.choice(SOURCES)}."
        if k == 5:
            return f"It runs {rng.choice(LENGTHS)}."
        return f"The {rng.choice(ASPECTS)} was {rng.choice(NEUTRAL_ADJ)}."
    a, b = rng.sample(ASPECTS, 2)
    k = rng.randrange(9)
    if k == 0:
        return f"The {a} was {modifier(rng)}{adj(rng, pol)}."
    if k == 1:
        return f"The {a} was {adj(rng, pol)} and the {b} was {modifier(rng)}{adj(rng, pol)}."
    if k == 2:
        # VADER weights the clause after "but" more, so it sets the polarity.
        return f"The {a} was {adj(rng, -pol)}, but the {b} was {modifier(rng)}{adj(rng, pol)}."
    if k == 3:
        # Negation of the opposite polarity: "was not good", "never felt dull".
        neg = rng.choice(["was not", "was never", "never felt", "was not at all"])
        return f"The {a} {neg} {adj(rng, -pol)}."
    if k == 4:
        return f"I {rng.choice(VERBS[pol])} the {a}."
    if k == 5:
        return f"What {rng.choice(NOUNS[pol])}."
    if k == 6:
        phrase = f"{modifier(rng, attributive=True)}{adj(rng, pol)} {rng.choice(FILM_WORDS)}"
        return f"Overall it was {'an' if phrase[0] in 'aeiou' else 'a'} {phrase}."
    if k == 7:
        return f"I would {rng.choice(RECOMMEND[pol])}."
    return f"The whole thing felt {modifier(rng)}{adj(rng, pol)} from start to finish."


def sentence_polarities(rng: random.Random) -> list[int]:
    n = rng.choice([1, 2, 2, 3, 3])
    mood = rng.choices(["pos", "neg", "mixed", "neutral"], weights=[30, 40, 20, 10])[0]
    if mood == "neutral":
        return [0] * n
    if mood == "mixed":
        pols = [rng.choice([+1, -1, 0]) for _ in range(max(n, 2))]
        pols[0], pols[1] = +1, -1
        rng.shuffle(pols)
        return pols
    sign = +1 if mood == "pos" else -1
    pols = [sign if rng.random() < 0.7 else 0 for _ in range(n)]
    pols[rng.randrange(n)] = sign  # at least one sentence carries the mood
    return pols


def response(rng: random.Random) -> str:
    """1-3 sentences, MIN_WORDS..MAX_WORDS words, always ending with a period."""
    while True:
        text = " ".join(sentence(rng, p) for p in sentence_polarities(rng))
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text


# -------------------------------------------------------------- generation

def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_prefs(rng, prompts, n, gold):
    """Two different responses per prompt, labelled by a Bradley-Terry coin flip on gold."""
    rows, agree, expected = [], 0, 0.0
    while len(rows) < n:
        prompt = rng.choice(prompts)
        a, b = response(rng), response(rng)
        ga, gb = gold(a), gold(b)
        if a == b or ga == gb:  # identical text / tied gold: the label would be pure noise
            continue
        p = 1.0 / (1.0 + math.exp(-(ga - gb) / TAU))
        if rng.random() >= p:
            a, b, ga, gb = b, a, gb, ga
        rows.append({"prompt": prompt, "chosen": " " + a, "rejected": " " + b})
        agree += ga > gb
        expected += max(p, 1.0 - p)
    return rows, {"realised": round(agree / n, 4), "expected": round(expected / n, 4)}


def gold_stats(scores: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(scores), 4),
        "std": round(statistics.pstdev(scores), 4),
        "frac_positive": round(sum(s > 0.05 for s in scores) / len(scores), 4),
        "frac_negative": round(sum(s < -0.05 for s in scores) / len(scores), 4),
    }


def main(out_dir: Path = HERE, tokenizer_dir: Path = REPO / "rlhf/assets/tiny_tokenizer") -> dict:
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    analyzer = SentimentIntensityAnalyzer()

    # Same score as rlhf.gold.vader_sentiment; inlined so generating the data
    # doesn't import the rlhf package (and whatever heavy deps it pulls in).
    def gold(text: str) -> float:
        return analyzer.polarity_scores(text)["compound"]

    titles = make_titles(rng)
    test_titles, train_titles = titles[:N_TEST_TITLES], titles[N_TEST_TITLES:]
    train_prompts = [t.format(t=x) for x in train_titles for t in PROMPT_TEMPLATES]
    test_prompts = [t.format(t=x) for x in test_titles for t in PROMPT_TEMPLATES]

    def sft(prompts, n):
        return [{"prompt": rng.choice(prompts), "completion": " " + response(rng)} for _ in range(n)]

    files = {
        "sft_train": sft(train_prompts, N_SFT_TRAIN),
        "sft_test": sft(test_prompts, N_SFT_TEST),
    }
    files["prefs_train"], ceiling_train = make_prefs(rng, train_prompts, N_PREFS_TRAIN, gold)
    files["prefs_test"], ceiling_test = make_prefs(rng, test_prompts, N_PREFS_TEST, gold)
    files["prompts_train"] = [{"prompt": p} for p in rng.sample(train_prompts, N_PROMPTS_TRAIN)]
    files["prompts_test"] = [{"prompt": p} for p in rng.sample(test_prompts, N_PROMPTS_TEST)]
    for name, rows in files.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)

    stats = {
        "seed": SEED,
        "tau": TAU,
        "counts": {name: len(rows) for name, rows in files.items()},
        "titles": {"train": len(train_titles), "test": len(test_titles)},
        "sft_train_gold": gold_stats([gold(r["completion"]) for r in files["sft_train"]]),
        "sft_test_gold": gold_stats([gold(r["completion"]) for r in files["sft_test"]]),
        # Accuracy an oracle reward model (= the gold scorer) would get on the labels.
        "prefs_test_agreement_ceiling": ceiling_test,
        "prefs_train_agreement_ceiling": ceiling_train,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")

    texts = [r["prompt"] + r["completion"] for r in files["sft_train"] + files["sft_test"]]
    texts += [r["prompt"] + r[k] for r in files["prefs_train"] + files["prefs_test"] for k in ("chosen", "rejected")]
    build_tokenizer(texts, tokenizer_dir)
    return stats


# ---------------------------------------------------------------- tokenizer

# General English, so the tokenizer has pieces for text outside the task.
GENERAL_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore, and he buys them on Tuesday.",
    "In 1969, two people walked on the Moon for the first time.",
    "Please send the report to the office before 5 p.m. tomorrow.",
    "What time does the train leave? It leaves at 7:45 from platform 3.",
    "Water boils at 100 degrees Celsius at sea level.",
    "They were walking home when it started to rain, so they ran.",
    "The committee will meet again next month to discuss the budget.",
    "Could you tell me where the nearest library is, please?",
    "He opened the window, looked outside, and smiled at the children playing.",
    "Our company builds software for hospitals, schools and small businesses.",
    "The recipe needs three eggs, two cups of flour and a pinch of salt.",
    "I think we should try a different approach to this problem.",
    "Science is the careful study of the natural world through observation.",
    "My grandmother was born in a village near the river in 1932.",
    "Every morning, the birds sing outside my bedroom window.",
    "The price of the new phone is $799, which is too expensive for me.",
    "If you have any questions, feel free to ask the teacher after class.",
    "They decided to move to another country because of his new job.",
    "The museum is closed on Mondays but open late on Fridays.",
    "Learning a new language takes time, patience and a lot of practice.",
    "The results were surprising: almost half of the users never logged in.",
    "Don't forget to bring an umbrella; it's going to rain all week.",
    "The computer program reads the file, counts the words and prints a summary.",
    "History shows that people have always told stories around the fire.",
    "The doctor explained that the medicine should be taken twice a day with food.",
    "Farmers in the valley grow wheat, corn, potatoes and several kinds of apples.",
    "The government announced new rules for energy, transport and public health.",
    "After dinner we usually play cards, read newspapers or listen to the radio.",
    "The engineer measured the bridge carefully and wrote down every number.",
    "Children learn mathematics, geography, chemistry and music at primary school.",
    "The storm damaged several buildings, although nobody was seriously injured.",
    "Scientists believe the universe began almost fourteen billion years ago.",
    "Her brother works as a journalist for a newspaper in the capital.",
    "The market opens early, and by noon most of the vegetables are gone.",
    "Remember to save your work regularly, especially when editing large documents.",
    "The mountains were covered with snow, and the lakes were frozen solid.",
    "Traffic was heavy this morning because of an accident on the highway.",
    "The university offers courses in economics, philosophy, biology and law.",
    "My neighbour repairs bicycles, motorcycles and sometimes old cars in his garage.",
    "The orchestra performed a symphony by a famous composer from the nineteenth century.",
    "Customers can return products within thirty days if they keep the receipt.",
    "Electricity travels through copper wires from the power station to our homes.",
    "The ancient city was built on a hill overlooking the ocean and the harbour.",
    "During the meeting, everyone agreed that the project needed more time and money.",
    "Birds, insects, reptiles and mammals all depend on healthy forests.",
    "The teacher asked the students to describe their favourite holiday in writing.",
    "Hospitals need nurses, surgeons, pharmacists and many other skilled workers.",
    "The kitchen smelled of fresh bread, coffee, garlic and roasted vegetables.",
    "Yesterday I bought a jacket, two shirts and a pair of comfortable shoes.",
    "The population of the region has doubled during the last twenty years.",
    "Please check your email and confirm your address before Wednesday.",
    "Airplanes, trains and ships carry millions of passengers every single day.",
    "The detective examined the evidence and questioned three witnesses.",
    "Although it was expensive, the apartment had a beautiful view of the park.",
    "Language models predict the next word from the words that come before it.",
    "The village celebrated the harvest with music, dancing and a large feast.",
    "Several important questions about climate, oceans and glaciers remain open.",
    "His grandfather collected stamps, coins and photographs from around the world.",
    "January, February, March, April, May, June, July, August, September, October, November, December.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    "North, south, east and west; left and right; above, below, inside and outside.",
    "\"Hello,\" she said. \"It's nice to meet you!\"",
    "def main():\n    print('hello, world')\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 50% #1 @home (yes) [no] {maybe}",
]


def build_tokenizer(texts: list[str], tokenizer_dir: Path) -> None:
    """Byte-level BPE (any text encodes, no unk) saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unk ever
        show_progress=False,
    )
    # General text repeated so its common words earn merges next to the task's.
    tok.train_from_iterator(texts + GENERAL_TEXT * 20, trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",  # distinct from eos, so masking pads never hides the eos
        padding_side="right",
        model_max_length=256,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) must return x exactly
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(tokenizer_dir))


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
