"""A bundled, deterministic demo corpus: synthetic sensitive records plus unrelated public text.

Everything is generated from a seed, so the package ships no data files. The private part holds
clinical notes and bank-support chats about invented people, with secret canary sentences planted
1, 4 or 16 times (for extraction tests and the demo) and unplanted control canaries; the public part is encyclopedic prose from a
different grammar with no secrets, used to train the demo tokenizer.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from dptrain.checkpoint import atomic_dir

DEMO_VERSION = 4  # part of every cache key: bump when the generator's output changes

CANARY_REPEATS = (0, 1, 4, 16)  # 0: never planted, a control for extraction tests
CANARIES_PER_REPEAT = 4
RECORDS_PER_USER = 8
# Where a canary's copies go: "spread" over random records (mostly of different users), or all
# into records of "one-user", the case that only user-level privacy protects.
CANARY_OWNERS = ("spread", "one-user")

FIRST = ("Amara Bilal Carmen Dmitri Elena Farid Greta Hiro Ines Jonas Kemal Lena Mateo Nadia Oskar "
         "Priya Quinn Rosa Sven Tala Umar Vera Wen Ximena Yusuf Zoe Aiko Bruno Chiara Dario").split()
LAST = ("Okafor Lindqvist Moreau Tanaka Haddad Novak Brennan Castillo Petrov Nakamura Osei Varga "
        "Schubert Iyer Kowalski Duarte Fischer Yilmaz Larsen Mendes Quiroga Abbott Sato Ferreira").split()
MONTHS = ("January February March April May June July August September October November "
          "December").split()
CONDITIONS = ("type 2 diabetes", "hypertension", "asthma", "migraine", "atrial fibrillation",
              "chronic kidney disease", "hypothyroidism", "major depressive disorder",
              "rheumatoid arthritis", "sleep apnea", "iron deficiency anemia", "psoriasis")
DRUGS = ("metformin", "lisinopril", "albuterol", "sumatriptan", "apixaban", "levothyroxine",
         "sertraline", "methotrexate", "atorvastatin", "omeprazole", "amlodipine", "prednisone")
SYMPTOMS = ("fatigue", "shortness of breath", "headache", "chest tightness", "dizziness",
            "joint pain", "nausea", "palpitations", "insomnia", "swelling of the ankles")
ISSUES = ("a card payment that was declined", "a duplicate charge", "a blocked online login",
          "a transfer that has not arrived", "a lost debit card", "an unexpected overdraft fee",
          "a mortgage payment date", "a suspicious withdrawal", "a change of address",
          "a standing order to a landlord")
CITIES = ("Lisbon Tampere Valparaiso Osaka Leeds Krakow Mombasa Tucson Ghent Hobart Porto "
          "Dortmund").split()

# Canaries: a fixed frame with a random secret; the prefix is the prompt, the secret the answer.
CANARY_FRAMES = (
    "The vault code for {name} is {secret}.",
    "My security answer, as {name}, is {secret}.",
    "Recovery phrase of {name}: {secret}.",
    "{name} keeps the spare key PIN {secret}.",
)
SECRET_WORDS = ("KESTREL", "MARZIPAN", "OBSIDIAN", "TUNDRA", "QUASAR", "JUNIPER", "CORVID",
                "PAPRIKA", "MONSOON", "ZEPHYR", "GRANITE", "LAGOON")

PUBLIC_TOPICS = ("river", "mountain", "harbour", "forest", "desert", "glacier", "island", "valley",
                 "library", "cathedral", "market", "railway", "bridge", "observatory", "garden")
PUBLIC_VERBS = ("was founded", "was rebuilt", "became known", "was first described",
                "was surveyed", "was restored", "grew rapidly", "was mapped", "was celebrated")
PUBLIC_ADJ = ("ancient", "northern", "quiet", "famous", "remote", "broad", "narrow", "coastal",
              "eastern", "modest", "vast", "historic", "fertile", "rocky", "sunlit", "windy")
PUBLIC_NOUNS = ("merchants", "farmers", "monks", "sailors", "scholars", "travellers", "weavers",
                "engineers", "pilgrims", "painters", "fishermen", "astronomers", "builders")
PUBLIC_PHRASES = (
    "Its name is thought to come from an old word for {adj} {topic}.",
    "In the {century} century, {nouns} from the {adj} coast settled near the {topic}.",
    "The {topic} of {place} {verb} around {year}, according to local records.",
    "Visitors often remark on the {adj} light that falls across the {topic} in {month}.",
    "Today the {topic} is home to about {num} {nouns} and a small museum.",
    "Early maps show the {topic} as {adj} and difficult to reach, although {nouns} crossed it each {season}.",
    "A {adj} {topic} lies {num} kilometres west of {place}, beyond the {adj2} hills.",
    "Historians disagree about why the {nouns} of {place} abandoned the {topic} in {year}.",
    "The climate is {adj}, with {num} millimetres of rain in an average year.",
)
SEASONS = ("spring", "summer", "autumn", "winter")
ANIMALS = ("herons", "otters", "foxes", "goats", "falcons", "beetles", "salmon", "wolves", "owls",
           "lizards", "swallows", "badgers", "dolphins", "moths", "bison", "cranes")
GOODS = ("copper", "wool", "salt", "amber", "timber", "pottery", "linen", "spices", "glassware",
         "leather", "silver", "barley", "olive oil", "paper", "indigo", "honey")
INSTRUMENTS = ("telescope", "loom", "windmill", "printing press", "compass", "sundial", "kiln",
               "water wheel", "lighthouse", "canal lock", "aqueduct", "clock tower")
MORE_PHRASES = (
    "The {adj} {topic} was once famous for its {goods} and its {goods2}.",
    "Naturalists counted {num} {animals} along the {topic} during the {season} of {year}.",
    "A {instrument} built by the {nouns} of {place} still stands beside the {topic}.",
    "Trade in {goods} made {place} prosperous, while its {nouns} exported {goods2} to distant ports.",
    "Legend says that {animals} guided the first {nouns} to the {adj} {topic}.",
    "The {instrument} of {place}, completed in {year}, was the largest of its kind for a century.",
    "During {month} the {animals} return, and the {nouns} of {place} hold a festival of {goods}.",
    "Scholars from {place} compared the {topic} with the {adj2} plains of {place2}.",
)
# Public text of the same domain, as a public medical leaflet or a bank's FAQ page would read: the
# words of the private records, none of their people. A tokenizer trained on it splits the private
# text into sensible pieces without ever seeing a private record.
DOMAIN_PHRASES = (
    "Clinic notes record the date, the patient's symptoms, their history and current medication, "
    "then the plan.",
    "Patients with {cond} are often prescribed {drug}, for example {dose} mg once daily.",
    "Common reasons for a visit include {sym} and {sym2} lasting {num} days.",
    "At each visit the clinic measures BP, pulse and temperature, for example BP {sys}/{dia}, "
    "pulse {pulse}, temperature {temp} C.",
    "A typical plan is to continue, increase, reduce or stop {drug} and review the patient in "
    "{weeks} weeks.",
    "Bank support agents ask the customer to confirm the account number and date of birth.",
    "Customers often call about {issue}; the agent raises a case and the customer will hear back "
    "within {weeks} working days.",
    "A payment of {amount} GBP to a merchant in {city} can appear as pending for a few days.",
    "Agent: Hello, how can I help? Customer: Hi, I am calling about {issue}. Agent: Thank you.",
)


def _domain_sentence(rng: random.Random) -> str:
    return rng.choice(DOMAIN_PHRASES).format(
        cond=rng.choice(CONDITIONS), drug=rng.choice(DRUGS), dose=rng.choice((5, 10, 20, 50, 100)),
        sym=rng.choice(SYMPTOMS), sym2=rng.choice(SYMPTOMS), num=rng.randint(2, 30),
        sys=rng.randint(100, 170), dia=rng.randint(60, 100), pulse=rng.randint(52, 118),
        temp=rng.randint(360, 392) / 10, weeks=rng.randint(1, 12), issue=rng.choice(ISSUES),
        amount=f"{rng.randint(5, 4000)}.{rng.randint(0, 99):02d}", city=rng.choice(CITIES))


def _place(rng: random.Random) -> str:
    syllables = ("ka", "lor", "ven", "mi", "tas", "ru", "bel", "dor", "an", "sel", "qui", "pra",
                 "nor", "es", "tal", "gri", "mo", "zan", "fel", "ith", "cu", "ster", "va", "ol")
    return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))).capitalize()


def _public_paragraph(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join(_domain_sentence(rng) for _ in range(rng.randint(3, 7)))
    sentences = []
    for _ in range(rng.randint(3, 7)):
        sentences.append(rng.choice(PUBLIC_PHRASES + MORE_PHRASES).format(
            adj=rng.choice(PUBLIC_ADJ), adj2=rng.choice(PUBLIC_ADJ), topic=rng.choice(PUBLIC_TOPICS),
            nouns=rng.choice(PUBLIC_NOUNS), verb=rng.choice(PUBLIC_VERBS), place=_place(rng),
            place2=_place(rng), animals=rng.choice(ANIMALS), goods=rng.choice(GOODS),
            goods2=rng.choice(GOODS), instrument=rng.choice(INSTRUMENTS),
            year=rng.randint(900, 1990), month=rng.choice(MONTHS), season=rng.choice(SEASONS),
            num=rng.randint(2, 9000), century=f"{rng.randint(10, 19)}th"))
    return " ".join(sentences)


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(2015, 2025)}"


def _account(rng: random.Random) -> str:
    return f"GB{rng.randint(10, 99)} DPTB {rng.randint(1000, 9999)} {rng.randint(1000, 9999)} {rng.randint(10, 99)}"


def _clinical_note(rng: random.Random, person: dict) -> str:
    cond, drug = rng.choice(CONDITIONS), rng.choice(DRUGS)
    parts = [
        f"Clinic note, {_date(rng)}. Patient: {person['name']}, born {person['dob']}, MRN {person['mrn']}.",
        f"Presents with {rng.choice(SYMPTOMS)} and {rng.choice(SYMPTOMS)} for {rng.randint(2, 30)} days.",
        f"History of {cond}. Current medication: {drug} {rng.choice((5, 10, 20, 25, 50, 100))} mg "
        f"{rng.choice(('once', 'twice'))} daily.",
        f"BP {rng.randint(100, 170)}/{rng.randint(60, 100)}, pulse {rng.randint(52, 118)}, "
        f"temperature {rng.randint(360, 392) / 10} C.",
        f"Plan: {rng.choice(('continue', 'increase', 'reduce', 'stop'))} {drug}, "
        f"review in {rng.randint(1, 12)} weeks. Contact: {person['phone']}.",
    ]
    return " ".join(parts)


def _support_chat(rng: random.Random, person: dict) -> str:
    agent = rng.choice(FIRST)
    amount = f"{rng.randint(5, 4000)}.{rng.randint(0, 99):02d}"
    turns = [
        f"Agent ({agent}): Hello, you are through to DPT Bank support. How can I help?",
        f"Customer: Hi, this is {person['name']} about {rng.choice(ISSUES)} on {_date(rng)}.",
        f"Agent ({agent}): Can you confirm the account number and your date of birth?",
        f"Customer: Account {person['account']}, born {person['dob']}.",
        f"Agent ({agent}): Thank you. I can see a payment of {amount} GBP to a merchant in "
        f"{rng.choice(CITIES)}. I have raised case {rng.randint(100000, 999999)} and you will "
        f"hear back within {rng.randint(2, 10)} working days.",
        "Customer: Great, thanks for your help.",
    ]
    return "\n".join(turns)


def _person(rng: random.Random) -> dict:
    return {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "dob": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1940, 2005)}",
        "mrn": f"{rng.randint(10**7, 10**8 - 1)}",
        "phone": f"+44 7{rng.randint(100, 999)} {rng.randint(100000, 999999)}",
        "account": _account(rng),
    }


def make_canaries(seed: int) -> list[dict]:
    """The secret strings planted in the private corpus, with how often each is planted."""
    rng = random.Random(f"canaries-{seed}")
    canaries = []
    for repeats in CANARY_REPEATS:
        for k in range(CANARIES_PER_REPEAT):
            frame = CANARY_FRAMES[k % len(CANARY_FRAMES)]
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            secret = f"{rng.randint(1000, 9999)}-{rng.choice(SECRET_WORDS)}-{rng.randint(1000, 9999)}"
            text = frame.format(name=name, secret=secret)
            prefix = text[: text.index(secret)]
            canaries.append({"id": f"canary-{len(canaries):02d}", "text": text, "prefix": prefix,
                             "secret": secret, "repeats": repeats})
    return canaries


def write_demo_corpus(out_dir: str | Path, seed: int = 0, num_records: int = 6_000,
                      num_public_paragraphs: int = 6_000, canary_owner: str = "spread") -> dict[str, Path]:
    """Write `private.jsonl` (text, user_id, kind), `public.txt` and `canaries.json` into `out_dir`.

    Same arguments, same bytes. Each canary is appended to `repeats` distinct records: random ones
    ("spread"), or records of one user ("one-user"; each planted canary gets its own user, named
    as `owner` in canaries.json).
    """
    if canary_owner not in CANARY_OWNERS:
        raise ValueError(f"canary_owner must be one of {CANARY_OWNERS}, not {canary_owner!r}")
    out_dir = Path(out_dir)
    rng = random.Random(f"private-{seed}")
    num_users = max(1, num_records // RECORDS_PER_USER)
    people = [_person(rng) for _ in range(num_users)]
    records = []
    for i in range(num_records):
        user = rng.randrange(num_users)
        make = _clinical_note if rng.random() < 0.5 else _support_chat
        records.append({"text": make(rng, people[user]), "user_id": f"user-{user:05d}",
                        "kind": "clinical_note" if make is _clinical_note else "support_chat"})
    canaries = make_canaries(seed)
    if num_records < max(CANARY_REPEATS):
        raise ValueError(f"num_records must be at least {max(CANARY_REPEATS)} to plant every canary")
    if canary_owner == "one-user":
        # its own stream, so the records and the public text stay those of the default corpus
        _plant_in_one_user(canaries, records, random.Random(f"owners-{seed}"))
    for canary in canaries:
        if canary_owner == "spread":
            canary["records"] = sorted(rng.sample(range(num_records), canary["repeats"]))
        for i in canary["records"]:
            records[i]["text"] += " " + canary["text"]
    pub_rng = random.Random(f"public-{seed}")
    public = "\n".join(_public_paragraph(pub_rng) for _ in range(num_public_paragraphs)) + "\n"

    with atomic_dir(out_dir) as tmp:
        with open(tmp / "private.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (tmp / "public.txt").write_text(public, encoding="utf-8")
        (tmp / "canaries.json").write_text(json.dumps(canaries, indent=1) + "\n", encoding="utf-8")
    return {"private": out_dir / "private.jsonl", "public": out_dir / "public.txt",
            "canaries": out_dir / "canaries.json"}


def _plant_in_one_user(canaries: list[dict], records: list[dict], rng: random.Random) -> None:
    """Give each planted canary a distinct owner with at least `repeats` records, and that many of them."""
    by_user: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_user.setdefault(record["user_id"], []).append(i)
    taken: set[str] = set()
    for canary in sorted(canaries, key=lambda c: -c["repeats"]):  # the most demanding first
        if canary["repeats"] == 0:
            canary["owner"], canary["records"] = None, []
            continue
        owners = sorted(u for u, rows in by_user.items() if len(rows) >= canary["repeats"] and u not in taken)
        if not owners:
            raise ValueError(f"no user left with {canary['repeats']} records to own {canary['id']}: "
                             "use more num_records")
        owner = rng.choice(owners)
        taken.add(owner)
        canary["owner"] = owner
        canary["records"] = sorted(rng.sample(by_user[owner], canary["repeats"]))


def prepare_demo(out_dir: str | Path, seq_len: int = 128, vocab_size: int = 2048, seed: int = 0,
                 num_records: int = 6_000, eval_fraction: float = 0.05, progress: bool = False,
                 canary_owner: str = "spread", unit: str = "sequence") -> Path:
    """Corpus -> tokenizer trained on the PUBLIC text -> prepared folder; returns the folder.

    Each stage is cached under `out_dir` by its arguments and skipped when already there. The
    eval split holds out whole users (`user_id`), never those carrying a canary, so every planted
    canary is trained on. The prepared folder gets a `canaries.json` with each canary's text,
    prefix, secret and how many train / eval documents contain it. `canary_owner`: see
    `write_demo_corpus`; `unit`: how the folder is packed (`dptrain data prepare --unit`).
    """
    from dptrain.data.prepare import prepare
    from dptrain.data.tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    # non-default choices name their own folders, so the default paths stay as they were
    owner_tag = "" if canary_owner == "spread" else f"-{canary_owner}"
    unit_tag = "" if unit == "sequence" else f"-by{unit}"
    corpus = out_dir / f"corpus-v{DEMO_VERSION}-seed{seed}-n{num_records}{owner_tag}"
    if not (corpus / "canaries.json").exists():
        write_demo_corpus(corpus, seed=seed, num_records=num_records, canary_owner=canary_owner)
    tokenizer = out_dir / f"tokenizer-v{DEMO_VERSION}-seed{seed}-vocab{vocab_size}.model"
    if not tokenizer.exists():
        # one thread: bit-reproducible, so every machine prepares the same demo tokens
        train_tokenizer([corpus / "public.txt"], vocab_size, tokenizer, num_threads=1, seed=seed)
    prepared = out_dir / (f"prepared-v{DEMO_VERSION}-seed{seed}-n{num_records}-vocab{vocab_size}"
                          f"-seq{seq_len}-eval{eval_fraction:g}{owner_tag}{unit_tag}")
    if not (prepared / "manifest.json").exists():
        canary_records = [r for c in json.loads((corpus / "canaries.json").read_text()) for r in c["records"]]
        prepare([corpus / "private.jsonl"], tokenizer, seq_len, prepared, group_column="user_id",
                eval_fraction=eval_fraction, seed=seed, progress=progress,
                keep_in_train=canary_records, unit=unit)
        _write_split_canaries(corpus / "canaries.json", prepared)
    return prepared


def prepare_configured_demo(data_cfg) -> Path:
    """`prepare_demo` with the `demo_*` fields of a run's data config (a `DataConfig`)."""
    return prepare_demo(data_cfg.path, seq_len=data_cfg.demo_seq_len, vocab_size=data_cfg.demo_vocab_size,
                        num_records=data_cfg.demo_records, canary_owner=data_cfg.demo_canary_owner,
                        unit=data_cfg.demo_unit)


def _write_split_canaries(canaries_path: Path, prepared: Path) -> None:
    """Count each canary's documents per split (written last; the manifest already exists)."""
    import numpy as np

    from dptrain.data.packed import PackedDataset

    canaries = json.loads(canaries_path.read_text())
    for split in json.loads((prepared / "manifest.json").read_text())["splits"]:
        docs = PackedDataset(prepared, split).document_table[:, 0]
        for canary in canaries:
            canary[f"{split}_repeats"] = int(np.isin(canary["records"], docs).sum())
    tmp = prepared / ".canaries.json.tmp"
    tmp.write_text(json.dumps(canaries, indent=1) + "\n")
    tmp.rename(prepared / "canaries.json")
