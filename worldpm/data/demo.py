"""The embedded demo dataset: StackExchange-like questions with voted answers, generated here, deterministically.

Offline and tiny, so `worldpm run` works on a fresh machine with no network. Like the real data, answers to one
question get net votes, and pairs are (more votes, fewer votes) with margin = the vote gap. Votes follow answer
quality with noise: a good answer is on topic, specific (it names the question's subject, gives steps and a
reason, sometimes code or a quantity); a weak one is vague, off topic or dismissive. A small reward model can
learn that, so the demo run ends with test accuracy clearly above chance, but the noise keeps it below 100%.
"""
from __future__ import annotations

import random
from itertools import combinations

import polars as pl

from worldpm.config import SourceConfig
from worldpm.data.schema import CANONICAL_SCHEMA
from worldpm.data.sources.common import pair_id

DOMAINS: dict[str, dict[str, list[str]]] = {
    "coffee.demo": {
        "subjects": ["a pour-over", "an espresso shot", "cold brew", "a French press", "a moka pot", "whole beans",
                     "a burr grinder", "milk foam", "decaf beans", "an AeroPress"],
        "problems": ["tastes bitter", "tastes sour", "is too weak", "goes stale quickly", "is inconsistent",
                     "clogs the filter", "is too hot", "foams badly"],
        "fixes": ["grind slightly coarser", "lower the water temperature to about 92 C", "use a 1:16 ratio",
                  "store the beans in an airtight opaque jar", "preheat the equipment", "descale with citric acid",
                  "shorten the brew time by 30 seconds", "weigh the dose on a scale"],
        "reasons": ["over-extraction pulls out harsh compounds", "under-extraction leaves acids unbalanced",
                    "oxygen degrades the aromatic oils", "temperature changes the extraction speed"],
    },
    "bicycles.demo": {
        "subjects": ["a road bike", "disc brakes", "a derailleur", "tubeless tires", "a chain", "a bottom bracket",
                     "a carbon frame", "wheel bearings", "a headset", "hydraulic brakes"],
        "problems": ["squeaks", "skips gears", "loses pressure overnight", "rubs when braking", "creaks under load",
                     "feels loose", "wears out quickly", "shifts late"],
        "fixes": ["clean and degrease the drivetrain", "adjust the barrel adjuster a quarter turn",
                  "add fresh sealant and reseat the bead", "torque the bolts to the printed value",
                  "replace the worn pads", "bleed the brake line", "lubricate the pivot points",
                  "true the wheel with a spoke key"],
        "reasons": ["contamination reduces friction where you need it", "cable stretch changes the indexing",
                    "sealant dries out after a few months", "loose parts move and creak under load"],
    },
    "gardening.demo": {
        "subjects": ["tomato plants", "a lawn", "basil", "a lemon tree", "roses", "seedlings", "a compost pile",
                     "potted herbs", "strawberries", "an apple tree"],
        "problems": ["have yellow leaves", "wilt in the afternoon", "grow leggy", "drop their flowers",
                     "get powdery mildew", "smell bad", "stop growing", "get aphids"],
        "fixes": ["water deeply twice a week instead of daily", "move it to six hours of direct sun",
                  "add a balanced fertiliser at half strength", "improve drainage with perlite",
                  "prune for airflow", "turn the pile and add dry leaves", "spray with diluted soap",
                  "mulch to keep the soil moisture even"],
        "reasons": ["roots rot when the soil stays wet", "plants stretch toward light they lack",
                    "nitrogen deficiency shows first in older leaves", "humidity and still air favour fungus"],
    },
    "photography.demo": {
        "subjects": ["night shots", "portraits", "a kit lens", "landscape photos", "indoor sports", "a flash",
                     "RAW files", "a tripod", "a prime lens", "long exposures"],
        "problems": ["come out blurry", "look noisy", "have blown highlights", "look flat", "show banding",
                     "are underexposed", "have a color cast", "show vignetting"],
        "fixes": ["use a shutter speed of at least 1/250 s", "expose to the right and lower it in post",
                  "set a custom white balance", "stop down to f/8", "bounce the flash off the ceiling",
                  "use the two-second timer", "shoot in RAW and apply lens corrections",
                  "raise ISO rather than slow the shutter"],
        "reasons": ["motion blur comes from the shutter being open too long", "sensor noise rises in the shadows",
                    "lenses are sharpest in the middle of their aperture range", "mixed light sources shift color"],
    },
    "programming.demo": {
        "subjects": ["a Python script", "a SQL query", "a bash loop", "a REST client", "a unit test",
                     "a pandas join", "a regex", "a Docker build", "a git rebase", "a JSON parser"],
        "problems": ["is slow", "fails randomly", "returns duplicates", "runs out of memory", "hangs",
                     "breaks on unicode", "gives the wrong count", "cannot find the file"],
        "fixes": ["add an index on the join column", "read the file in chunks", "pin the dependency versions",
                  "use a set for membership tests", "pass encoding='utf-8' explicitly", "add a timeout and retry",
                  "deduplicate on the primary key", "use an absolute path from __file__"],
        "reasons": ["a nested loop makes it quadratic", "loading everything at once exhausts RAM",
                    "the default encoding differs between machines", "a race between processes"],
    },
}
VAGUE = ["Hard to say, it depends on a lot of things.", "Just search online, there are many guides.",
         "I had the same issue once. No idea what fixed it.", "Maybe try something else?",
         "Why would you want to do that?", "Works fine for me.", "Ask a professional.",
         "Probably a defect, return it.", "Not sure this is the right place to ask."]
OFF_TOPIC = ["Honestly I prefer tea to all of this.", "Have you considered buying a new one instead?",
             "The weather matters more than people think.", "My cousin says the brand is everything."]
CODE = {"programming.demo": ["```python\nseen = set()\nfor row in rows:\n    if row.id in seen:\n        continue\n"
                             "    seen.add(row.id)\n```", "```sql\nCREATE INDEX idx_user ON orders(user_id);\n```",
                             "```bash\nfor f in *.csv; do wc -l \"$f\"; done\n```"]}


def _good_answer(rng: random.Random, dom: dict, domain: str, subject: str, problem: str) -> str:
    fixes = rng.sample(dom["fixes"], k=rng.randint(2, 3))
    steps = "\n".join(f"{i}. {f[0].upper() + f[1:]}." for i, f in enumerate(fixes, 1))
    parts = [f"When {subject} {problem}, the usual cause is that {rng.choice(dom['reasons'])}.",
             f"What works for me:\n\n{steps}"]
    if domain in CODE and rng.random() < 0.6:
        parts.append(rng.choice(CODE[domain]))
    parts.append(f"After that, check {subject} again; if it still {problem}, {rng.choice(dom['fixes'])}.")
    return "\n\n".join(parts)


def _ok_answer(rng: random.Random, dom: dict, subject: str) -> str:
    return f"You could {rng.choice(dom['fixes'])}. That sometimes helps with {subject}."


def _weak_answer(rng: random.Random) -> str:
    return rng.choice(VAGUE) + ("" if rng.random() < 0.5 else " " + rng.choice(OFF_TOPIC))


def generate(rows: int = SourceConfig.model_fields["rows"].default, seed: int = 0, tag: str = "demo",
             max_pairs_per_question: int = SourceConfig.model_fields["max_pairs_per_question"].default) -> pl.DataFrame:
    """`rows` questions -> canonical pairs (several per question, every question at least one), the same for the
    same (rows, seed, tag). Pairs of a question: the widest vote gaps first, at most max_pairs_per_question.
    The defaults are pipeline.yaml's (SourceConfig's)."""
    rng = random.Random(seed)
    names = sorted(DOMAINS)
    out: list[dict] = []
    for q in range(rows):
        domain = names[q % len(names)]
        dom = DOMAINS[domain]
        subject, problem = rng.choice(dom["subjects"]), rng.choice(dom["problems"])
        question = (f"Why {subject} {problem}?\n\nI have {subject} and lately it {problem}. "
                    f"I tried to {rng.choice(dom['fixes'])} but nothing changed. What should I check?")
        answers = []
        for kind in rng.sample(["good", "ok", "weak", "weak", "good"], k=rng.randint(2, 4)):
            if kind == "good":
                text, base = _good_answer(rng, dom, domain, subject, problem), 8
            elif kind == "ok":
                text, base = _ok_answer(rng, dom, subject), 3
            else:
                text, base = _weak_answer(rng), 0
            votes = base + round(rng.gauss(0, 2.5))  # noise: sometimes a weaker answer gets more votes
            answers.append((text, votes, base))
        if len({v for _, v, _ in answers}) == 1:  # all tied: no pair; the best answer gets one more vote
            best = max(range(len(answers)), key=lambda i: (answers[i][2], -i))
            answers[best] = (answers[best][0], answers[best][1] + 1, answers[best][2])
        answers = [(t, v) for t, v, _ in answers]
        prompt = [{"role": "user", "content": question}]
        pairs = [(a, b) if a[1] > b[1] else (b, a) for a, b in combinations(answers, 2) if a[1] != b[1]]
        pairs.sort(key=lambda p: p[0][1] - p[1][1], reverse=True)
        date = f"20{15 + q % 9:02d}-{1 + q % 12:02d}-{1 + q % 28:02d}"
        for (c, cv), (r, rv) in pairs[:max_pairs_per_question]:
            out.append({"pair_id": pair_id(tag, prompt, c, r), "source": tag, "domain": domain,
                        "group_id": f"demo:{seed}:{q}", "prompt": prompt, "chosen": c, "rejected": r,
                        "chosen_score": float(cv), "rejected_score": float(rv), "margin": float(cv - rv),
                        "date": date})
    return pl.DataFrame(out, schema=CANONICAL_SCHEMA)
