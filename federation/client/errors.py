"""The client's refusals that carry no signature of their own (the ClientApp signs them)."""


class BudgetExceeded(RuntimeError):
    """The requested round would take the client past its (ε, δ) budget."""
