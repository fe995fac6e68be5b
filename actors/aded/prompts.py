"""Generic prompts written for this project: none comes from a benchmark (MT-Bench, HumanEval, ...).

``CORPUS_PROMPTS`` feed the self-generated part of the seed corpus (the target's own answers);
``TUNING_PROMPTS`` are kept apart from them and only used to record simulator traces, so tuning never
measures a drafter on text its matrix was built from.
"""

from __future__ import annotations

_CODE_TASKS = [
    "reads a CSV file and returns the average of a named numeric column",
    "flattens a nested list of arbitrary depth",
    "counts the words in a text file and returns the ten most common",
    "validates an IPv4 address given as a string",
    "merges two dictionaries, summing the values of shared keys",
    "converts a temperature between Celsius, Fahrenheit and Kelvin",
    "parses a duration such as '1h30m' into seconds",
    "removes duplicate lines from a file while keeping their order",
    "computes the Levenshtein distance between two strings",
    "groups a list of dictionaries by the value of a given key",
    "chunks a list into sublists of a given size",
    "returns the intersection of several sets of strings",
    "implements a simple LRU cache class with get and put methods",
    "retries a function call up to n times with exponential backoff",
    "walks a directory tree and returns the total size of all files",
    "formats a number of bytes as a human readable string",
    "implements a stack class with push, pop, peek and is_empty",
    "transposes a matrix given as a list of lists",
    "checks whether two strings are anagrams of each other, ignoring case",
    "computes a moving average over a list of numbers",
    "finds all email addresses in a block of text with a regular expression",
    "serialises a dataclass instance to a JSON string",
    "implements binary search over a sorted list",
    "rotates a list to the right by k positions",
    "builds a frequency histogram of characters and prints it",
    "computes the median of a list without modifying it",
    "implements a queue using two stacks",
    "converts a Roman numeral to an integer",
    "splits camelCase identifiers into lowercase words",
    "implements a bank account class with deposits and withdrawals",
]

_CHAT_TASKS = [
    "Explain how a hash table works to a beginner programmer.",
    "What are the main differences between a process and a thread?",
    "Give me five tips for staying focused while studying.",
    "Describe the water cycle in simple terms.",
    "Write a short poem about autumn leaves.",
    "How does compound interest work? Give an example.",
    "What is the difference between weather and climate?",
    "Summarise the benefits of regular exercise.",
    "Write a polite email asking a colleague to review a document.",
    "Explain what an API is, with an everyday analogy.",
    "What should I pack for a three-day hiking trip?",
    "Describe how vaccines help the immune system.",
    "Give a brief history of the printing press.",
    "Explain recursion and give a small example.",
    "What are some good habits for writing clean code?",
    "Write a short story about a robot learning to paint.",
    "How do solar panels turn sunlight into electricity?",
    "List the pros and cons of working from home.",
    "Explain the difference between a list and a tuple in Python.",
    "What is machine learning? Keep it short.",
    "Write a product description for a reusable water bottle.",
    "How can I improve my public speaking skills?",
    "Explain photosynthesis step by step.",
    "Describe three famous landmarks in Europe.",
    "What is the role of a database index?",
    "Give advice to someone starting their first job.",
    "Explain what version control is and why teams use it.",
    "Write a haiku about the ocean.",
    "Compare electric cars and petrol cars.",
    "How does the internet route a message from one computer to another?",
    "Explain the rules of chess briefly.",
    "What makes a good team leader?",
    "Describe a healthy breakfast and why it is healthy.",
    "Explain how a bicycle stays upright.",
    "Write a thank-you note to a teacher.",
    "What are prime numbers and why are they useful in cryptography?",
    "Suggest a weekly plan for learning a new language.",
    "Explain the difference between RAM and storage.",
    "Describe the life cycle of a butterfly.",
    "Write a short dialogue between a customer and a shop assistant.",
]

_TOPICS = [
    "black holes", "the French Revolution", "blockchain", "coral reefs", "inflation", "the immune system",
    "renewable energy", "the Roman Empire", "quantum computing", "volcanoes", "social media", "sleep",
    "meditation", "the stock market", "climate change", "artificial intelligence", "the human brain",
    "recycling", "space exploration", "the Olympic Games", "democracy", "electric guitars", "coffee",
    "bees", "the moon", "earthquakes", "photography", "chess", "jazz music", "the printing press",
    "rainforests", "nuclear power", "vaccines", "urban gardening", "cloud computing", "open source software",
    "the Great Wall of China", "time management", "budgeting", "friendship", "marathon running",
    "volunteering", "cybersecurity", "3D printing", "the water cycle", "dinosaurs", "the Renaissance",
    "smartphones", "remote work", "plastic pollution",
]

_CHAT_TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are the most important facts about {t}?",
    "Write a short paragraph about {t} for a school newsletter.",
]

_CODE_TEMPLATES = [
    "Write a Python function that {t}.",
    "Implement a Python function that {t}. Include a docstring and a short usage example.",
]

#: Prompts whose answers (by the target itself) join the seed corpus.
CORPUS_PROMPTS: list[str] = (
    [tpl.format(t=t) for tpl in _CODE_TEMPLATES for t in _CODE_TASKS]
    + _CHAT_TASKS
    + [tpl.format(t=t) for tpl in _CHAT_TEMPLATES for t in _TOPICS]
)

#: Held-out prompts for recording simulator traces; never used to build a matrix.
TUNING_PROMPTS: list[str] = [
    "Write a Python function that returns the n-th row of a multiplication table as a list.",
    "Write a Python function that normalises whitespace in a string.",
    "Write a Python class representing a 2D point with distance and midpoint methods.",
    "Write a Python function that checks whether a list is sorted in non-decreasing order.",
    "Write a Python function that converts a list of (key, value) pairs into a dictionary of lists.",
    "Complete this function:\n\ndef clamp_all(values: list[float], low: float, high: float) -> list[float]:\n"
    '    """Return a new list where every value is limited to the range [low, high]."""\n',
    "Complete this function:\n\ndef count_vowels(text: str) -> int:\n"
    '    """Return how many vowels (a, e, i, o, u, either case) the text contains."""\n',
    "Complete this function:\n\ndef running_max(xs: list[int]) -> list[int]:\n"
    '    """Return a list whose i-th element is the largest of xs[0..i]."""\n',
    "Explain the difference between a compiler and an interpreter.",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "How does a refrigerator keep food cold?",
    "Write a short motivational message for someone preparing for an exam.",
    "What are the advantages of using a spreadsheet for a household budget?",
    "Describe how to make a cup of tea, step by step.",
    "Explain why the sky looks blue during the day.",
    "Write a limerick about a cat who loves boxes.",
    "What is the purpose of unit tests in software development?",
    "Summarise the main causes of traffic congestion in cities.",
    "Rewrite this sentence to sound more formal: 'we gotta fix this bug asap or the boss will freak out'.",
    "List four ways to reduce household energy use and explain each briefly.",
]
