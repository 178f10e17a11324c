"""How close a store serves each adapter to its original: ``verify`` measures it, ``repair``
stores the ones that lost too much exactly, ``prompts`` are what it is measured on."""
