"""Paper-style figures. Plot functions take finished numbers (tables, arrays) and only draw."""
