/* Test library B: the definition that follows A's in load order. */
const char *fcsp_probe(void)
{
    return "B";
}
