"""The words of the demo conversations: what users ask without tools, what the model answers and
how it reasons at each effort. Reasoning grows with effort (low ~10 tokens, high ~60), which is
what the system message's `Reasoning: low|medium|high` is meant to control.

Slots: {need} the request in a few words, {plan} what to do about it, {tool} a function's name,
{args} its arguments, {result} what the tool returned. In `asks` tuples the last two phrasings
are held out of training.
"""

CALL_REASONING = {
    "low": ("User wants {need}. Call {tool}.", "Need {need}; use {tool}."),
    "medium": (
        "The user asks for {need}. The {tool} tool can get this, so I will call it with {args}.",
        "They want {need}. I have {tool} for that; calling it with {args}.",
    ),
    "high": (
        "The user is asking for {need}. I can't know that on my own, so I should use a tool. "
        "Looking at the available functions, {tool} fits this request. Its arguments come "
        "straight from the message: {args}. I will call {tool} with exactly those values and "
        "then report what it returns.",
        "Let me think about this request: the user wants {need}. That needs live data or an "
        "exact computation, which a tool provides. Among the tools, {tool} is the right one, "
        "and the request gives me everything it needs: {args}. So the plan is to call {tool} "
        "now and answer with its result.",
    ),
}
ANSWER_REASONING = {
    "low": ("{tool} returned {result}.", "Got {result}."),
    "medium": (
        "The {tool} call returned {result}. That answers the question, so I will reply with it.",
        "The tool says {result}. I can answer the user now.",
    ),
    "high": (
        "The tool {tool} came back with {result}. This is exactly the information the user "
        "asked for, {need}. I should state it clearly in one sentence and use the value from "
        "the tool without changing it.",
        "Now I have the result from {tool}: {result}. The user wanted {need}, and this answers "
        "it directly. There is no need for another call. I will give a short final answer "
        "that includes the result as returned.",
    ),
}
DIRECT_REASONING = {
    "low": ("User wants {need}. Just {plan}.", "Simple: {plan}."),
    "medium": (
        "The user is asking for {need}. No tool is needed, so I will {plan}.",
        "This is a request for {need}. I can {plan} directly.",
    ),
    "high": (
        "The user is asking for {need}. Let me think about how to respond. This does not need "
        "any tool call, because I can handle it myself. The best response is to {plan}. I will "
        "keep the answer short and clear.",
        "Let me consider the request: the user wants {need}. None of the tools are needed for "
        "that, and I already know how to respond. So I will {plan}, in a brief and friendly way.",
    ),
}

INSTRUCTIONS = (
    "You are a helpful assistant.",
    "Be concise.",
    "You are a helpful assistant. Use the tools when they help.",
    "Answer briefly and accurately.",
    "You are a friendly assistant for travellers.",
)

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("the United Kingdom", "London"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("India", "New Delhi"), ("China", "Beijing"),
    ("Brazil", "Brasília"), ("Mexico", "Mexico City"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Russia", "Moscow"),
    ("Turkey", "Ankara"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Switzerland", "Bern"), ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"),
)  # fmt: skip
CAPITAL_ASKS = ("What is the capital of {country}?", "capital of {country}",
                "What's the capital city of {country}?", "Tell me the capital of {country}.",
                "Which city is the capital of {country}?",
                "Do you know the capital of {country}?")  # fmt: skip
CAPITAL_ANSWERS = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
)

WORDS = (
    "apple", "river", "blue", "green", "quick", "fox", "jumps", "over", "lazy", "dog", "music",
    "light", "stone", "cloud", "happy", "small", "garden", "window", "coffee", "train", "moon",
    "sun", "star", "paper", "yellow", "orange", "table", "chair", "mountain", "ocean", "bread",
    "cat", "bird", "tree", "road", "book", "pencil", "silver", "gold", "winter", "summer",
    "north", "south", "red", "bright", "quiet", "loud", "fast", "slow", "warm", "cold",
)  # fmt: skip
REPEAT_ASKS = ("Repeat after me: {phrase}", "Say this back to me: {phrase}", "Echo: {phrase}",
               "Please repeat: {phrase}", "Can you repeat this: {phrase}",
               "Repeat exactly: {phrase}")  # fmt: skip

# (asks, need, plan, answers): small talk the model answers without tools
SMALL_TALK = (
    (("Hi", "Hello!", "Hey there", "Good morning", "Hi, how are you?", "Hey!", "Hello",
      "Good evening!"),
     "a greeting", "greet them back and offer help",
     ("Hello! How can I help you today?", "Hi! What can I do for you?",
      "Hello! I'm doing well, thanks. How can I help?")),
    (("Who are you?", "What are you?", "What can you do?", "Tell me about yourself.",
      "Introduce yourself.", "What kind of assistant are you?"),
     "an introduction", "say what I am and what I can do",
     ("I'm a tiny demo model running on moerun. With the right tools I can check the weather "
      "and the time, do arithmetic, convert currencies and look up stock prices.",)),
    (("Thanks!", "Thank you.", "Great, thanks a lot!", "thx", "Thanks for the help.",
      "Thank you so much!"),
     "nothing more, they are thanking me", "say they are welcome",
     ("You're welcome!", "Glad I could help!", "Happy to help!")),
)  # fmt: skip

# words around a training request that change nothing it asks for: without them a small model
# finds an argument by its distance from the end of the message, and "Can you convert 20 CAD
# to INR for me?" became a call from INR
ASK_PREFIXES = ("Hi! ", "Hi there. ", "Quick question. ", "I need some help. ", "One more thing. ",
                "Sorry to bother you. ", "Hey there! ", "Good morning. ", "OK. ")  # fmt: skip
ASK_SUFFIXES = (" Thanks!", " Thank you.", " Please.", " Thanks in advance.", " Quickly, please.",
                " I need it now.", " Cheers.", " Much appreciated.")  # fmt: skip

REFUSE_PLAN = "explain that I have no tool to look that up"
REFUSE_ANSWERS = ("Sorry, I can't get {need} because I don't have a tool for that.",
                  "I don't have a tool to look up {need} right now.")  # fmt: skip

CAPITAL_FORMAT = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}
REPLY_FORMAT = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
