"""Sources: files read (`read`), field paths resolved (`fieldpath`, `fields`), second tables
joined (`joins`), and one function per layout turning rows into the internal form
(`layouts`, `columns`)."""
